"""Addresses as users write them: "ip:port", "[ipv6]:port", "host:port"."""
import socket

from kvcache.status import LLMException, LLMStatusCode


def parse_address(text):
    """(host, port) from "ip:port", "[ipv6]:port" or "name:port" (port
    0..65535). LLM_PARAM_INVALID otherwise."""
    text = str(text).strip()
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""                  # an IPv6 literal needs brackets before its port
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                           f"address {text!r} is not 'ip:port', '[ipv6]:port' or 'host:port'")
    return host, int(port)


def format_address(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_socket(host, port, backlog=64):
    """A listening TCP socket on the first address ``host`` resolves to."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as exc:
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                           f"cannot listen on {format_address(host, port)}: {exc}") from None
