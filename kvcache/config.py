"""The KVCACHE_* environment, read in one place (at the moment a value is
needed, so a process may set it before creating an engine).

KVCACHE_RDMA_NICS      comma-separated RDMA devices (default: all); local
                       device i uses NIC i modulo their count
KVCACHE_RDMA_GID_INDEX GID index (default: the RoCE v2 IPv4-mapped GID)
KVCACHE_SOCKET_IFNAME  pick the GID on this netdev
KVCACHE_IB_TIMEOUT     ACK timeout exponent (default 14)
KVCACHE_RELAX_ORDERING on: register memory with relaxed ordering
KVCACHE_RDMA_QPS       QPs per link (default 2)
KVCACHE_AUTH_KEY       the shared secret every link must prove
KVCACHE_AUTH_KEY_FILE  a file holding it, when KVCACHE_AUTH_KEY is unset
KVCACHE_DEBUG          on: debug logging for the kvcache loggers

Switches (KVCACHE_DEBUG, KVCACHE_RELAX_ORDERING) are booleans: 1/true/yes/on
turn them on, 0/false/no/off or unset leave them off (any case); anything else
is LLM_PARAM_INVALID rather than a guess."""
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


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("", "0", "false", "no", "off")


def env_flag(name):
    text = os.environ.get(name, "").strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                       f"{name}={os.environ[name]!r} is not a boolean (use one of "
                       f"{', '.join(TRUE_WORDS)} or {', '.join(FALSE_WORDS[1:])})")


def apply_debug():
    """KVCACHE_DEBUG on: the kvcache loggers log at DEBUG. Only the
    ``kvcache`` logger is touched, never the root, so other libraries' output
    is unchanged (a handler is the application's business; none is installed
    here; the ``kvcache`` command installs one on the ``kvcache`` logger)."""
    if env_flag("KVCACHE_DEBUG"):
        logging.getLogger("kvcache").setLevel(logging.DEBUG)
