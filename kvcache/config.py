"""The KVCACHE_* environment, read in one place (at the moment a value is
needed, so a process may set it before creating an engine).

KVCACHE_RDMA_NICS      comma-separated RDMA devices (default: all); local
                       device i uses NIC i modulo their count
KVCACHE_RDMA_GID_INDEX GID index (default: the RoCE v2 IPv4-mapped GID)
KVCACHE_SOCKET_IFNAME  pick the GID on this netdev
KVCACHE_IB_TIMEOUT     ACK timeout exponent (default 14)
KVCACHE_RELAX_ORDERING 1: register memory with relaxed ordering
KVCACHE_RDMA_QPS       QPs per link (default 2)
KVCACHE_AUTH_KEY       the shared secret every link must prove
KVCACHE_AUTH_KEY_FILE  a file holding it, when KVCACHE_AUTH_KEY is unset
KVCACHE_TLS_CERT       PEM certificate of this end: TLS on the control
                       channel and TCP data lanes (with KVCACHE_TLS_KEY)
KVCACHE_TLS_KEY        its private key (PEM)
KVCACHE_TLS_CA         PEM CA file: the other end must present a
                       certificate it signed (mutual when both have one)
KVCACHE_SHM_ALLOWED_UIDS  comma-separated uids, besides our own, whose
                       processes may map our caches over shm (default none)
KVCACHE_PEER_MAX_QUEUED       replies queued per link for a peer that has
                       not read them (default 64); then its requests wait,
                       and it is dropped after io_timeout_ms
KVCACHE_PEER_MAX_QUEUED_BYTES READ data and descriptor tables those replies
                       hold (default 64 MiB; one reply always fits)
KVCACHE_PEER_MAX_NOTIFICATIONS  unread notifications kept per peer (default
                       1024); past it the sender gets LLM_OUT_OF_MEMORY
KVCACHE_PEER_MAX_NOTIFY_BYTES   their bytes per peer (default 64 MiB)
KVCACHE_DEBUG          1: debug logging for the kvcache loggers"""
import logging
import os

from kvcache.status import LLMException, LLMStatusCode


def env_str(name, default=""):
    return os.environ.get(name, "") or default


def env_int(name, default):
    text = os.environ.get(name, "")
    try:
        return int(text) if text else default
    except ValueError:
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                           f"{name}={text!r} is not an integer") from None


def env_list(name):
    return [item for item in os.environ.get(name, "").split(",") if item]


def env_flag(name):
    return os.environ.get(name, "") == "1"


def apply_debug():
    """KVCACHE_DEBUG=1: the kvcache loggers log at DEBUG (a handler is the
    application's business; none is installed)."""
    if env_flag("KVCACHE_DEBUG"):
        logging.getLogger("kvcache").setLevel(logging.DEBUG)
