"""The KVCACHE_* environment, read in one place (at the moment a value is
needed, so a process may set it before creating an engine).

KVCACHE_RDMA_NICS      comma-separated RDMA devices (default: all); local
                       device i uses NIC i modulo their count
KVCACHE_RDMA_GID_INDEX GID index (default: the RoCE v2 IPv4-mapped GID)
KVCACHE_SOCKET_IFNAME  pick the GID on this netdev; the FastDeploy-compatible
                       decoder listens on its IPv4 address
KVCACHE_IB_TIMEOUT     ACK timeout exponent (default 14)
KVCACHE_RELAX_ORDERING on: register memory with relaxed ordering
KVCACHE_RDMA_QPS       QPs per link (default 2)
KVCACHE_AUTH_KEY       the shared secret every link must prove
KVCACHE_AUTH_KEY_FILE  a file holding it, when KVCACHE_AUTH_KEY is unset
KVCACHE_DEBUG          on: the kvcache loggers log at DEBUG (each transfer:
                       op, peer, bytes, descriptors, ms; link events are
                       INFO); printed on stderr unless the application
                       configured logging (then its handlers get them).
                       Other libraries' loggers and the root logger are
                       never touched (kvcache.log)
KVCACHE_DEBUG_FILE     append the kvcache loggers' records to this file (DEBUG
                       and up with KVCACHE_DEBUG on, else what the logging
                       configuration lets through: WARNING and up by default)
KVCACHE_ERROR_FILE     append the kvcache loggers' ERROR records to this file
KVCACHE_TRANSPORT      the FastDeploy-compatible RDMACommunicator's transport:
                       rdma, tcp, shm or auto (default: RDMA where a device
                       is usable, else TCP)
KVCACHE_ACL_LIB        path of libascendcl.so (default: $ASCEND_HOME_PATH/lib64, the CANN
                       install locations, the loader path); read by pyverbs_kv.acl at
                       its first load
KVCACHE_CUDA_LIB       path of libcudart (default: libcudart.so.13/.12/.so, then torch's
                       bundled copy); read by pyverbs_kv.cuda at its first load
KVCACHE_DEVICE_TYPE    where Placement.DEVICE caches live when LLMConfig.device_type
                       is unset: npu (ACL) or cuda (default: none, DEVICE refused);
                       cuda also makes the Mooncake and FastDeploy entry points ask
                       the CUDA runtime first where registered memory lies
KVCACHE_DEVICE_POOL_SIZE  bytes of the device memory pool (default 256 MiB)
KVCACHE_DEVICE_CHUNK_BYTES  bytes of each pinned staging slot device caches and
                       device memory registered with the engine move through
                       (default 4 MiB)
KVCACHE_ETCD_TTL_S     lease of the records an engine keeps in etcd, in seconds
                       (default 10; kvcache.engine.discovery)
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

Switches (KVCACHE_DEBUG, KVCACHE_RELAX_ORDERING) are booleans: 1/true/yes/on
turn them on, 0/false/no/off or unset leave them off (any case); anything else
is LLM_PARAM_INVALID rather than a guess."""
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
