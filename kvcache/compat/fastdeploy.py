"""Baidu FastDeploy's KV transfer entry point (``rdma_comm.RDMACommunicator``
of its kvcache_transfer component) over kvcache's TransferEngine, so a
FastDeploy user switches by changing one import:

    from rdma_comm import RDMACommunicator                     # before
    from kvcache.compat.fastdeploy import RDMACommunicator     # after

The contract, as FastDeploy's: the decode role listens on ``port`` and
offers its caches; the prefill role ``connect``s to a decoder and
``write_cache``s blocks of one layer into the decoder's blocks. Block i of
layer L is ``block_bytes`` bytes at ``local_key_cache[L] + i * block_bytes``
and, unless the value list is empty (a key-only MLA layout), at
``local_value_cache[L] + i * block_bytes``; one write moves the key and the
value blocks. ``connect`` answers a ConnStatus (FastDeploy's values, 0 when
connected), ``write_cache`` 0 on success and a negative WriteStatus
otherwise; neither raises.

Unlike FastDeploy: it runs without RDMA (``transport`` tcp, shm, rdma or
auto); an error completion, a dead decoder or a missed deadline is a
negative result, never success; caches in CUDA memory are found and their
blocks staged through pinned host buffers (kvcache.device.engine); each
cache is registered once, at construction, not again per connection; block
ids outside ``block_number``
(the decoder's for remote ids) and layers outside the key list are refused
before anything moves; every wait has a deadline."""
import fcntl
import logging
import os
import socket
import struct
import threading
import time
import weakref
from enum import IntEnum

import numpy as np

from kvcache import checks
from kvcache.checks import public
from kvcache.log import setup as setup_logging
from kvcache.config import env_str
from kvcache.device.engine import TransferEngine
from kvcache.device.runtime import locate_memory
from kvcache.engine.address import format_address
from kvcache.rdma_support import rdma_status
from kvcache.status import LLMException, LLMStatusCode

log = logging.getLogger(__name__)

TRANSPORT_CHOICES = ("auto", "rdma", "tcp", "shm")
LAYOUT_METHOD = "fastdeploy.layout"
# Variables that configure the RDMA transport only.
RDMA_ONLY_ENV = ("KVCACHE_RDMA_NICS", "KVCACHE_RDMA_GID_INDEX", "KVCACHE_IB_TIMEOUT",
                 "KVCACHE_RELAX_ORDERING")
_SIOCGIFADDR = 0x8915          # linux/sockios.h: an interface's IPv4 address


class ConnStatus(IntEnum):
    """``connect``'s result, with FastDeploy's values (its ConnStatus). It
    equals 0 when connected, as FastDeploy's cache messager tests
    (``ret == 0``), and is true only then, as FastDeploy's README reads it
    (``if comm.connect(...)``)."""
    CONNECTED = 0
    DISCONNECTED = 1
    ERROR = 2
    TIMEOUT = 3
    INVALID_PARAMETERS = 4

    def __bool__(self):
        return self is ConnStatus.CONNECTED


class WriteStatus(IntEnum):
    """``write_cache``'s result: 0, or negative. FastDeploy answers -1 for
    every failure; the other codes say more, and each is logged with the
    LLMException behind it."""
    OK = 0
    INVALID = -1            # bad arguments (ids, layer, lengths): nothing moved
    NOT_CONNECTED = -2      # no link to ip:port (never connected, or it ended)
    LINK_FAILED = -3        # the link broke: decoder gone, error completion
    TIMEOUT = -4            # the deadline passed; the link is closed
    FAILED = -5             # anything else (the decoder refused the pieces)


_WRITE_CODES = {
    LLMStatusCode.LLM_PARAM_INVALID: WriteStatus.INVALID,
    LLMStatusCode.LLM_NOT_YET_LINK: WriteStatus.NOT_CONNECTED,
    LLMStatusCode.LLM_ENGINE_FINALIZED: WriteStatus.NOT_CONNECTED,
    LLMStatusCode.LLM_LINK_FAILED: WriteStatus.LINK_FAILED,
    LLMStatusCode.LLM_TIMEOUT: WriteStatus.TIMEOUT,
}

_noted = set()
_noted_lock = threading.Lock()


def choose_transport(requested=None):
    """(transport name, why): ``requested``, else KVCACHE_TRANSPORT, else
    "auto", which takes RDMA where a device is usable and TCP otherwise
    (not shared memory: a decoder usually lives on another host)."""
    name = requested if requested is not None else (env_str("KVCACHE_TRANSPORT") or "auto")
    if name not in TRANSPORT_CHOICES:
        raise checks.invalid(f"transport must be one of {TRANSPORT_CHOICES}, got {name!r}")
    if name != "auto":
        return name, "requested"
    status = rdma_status()
    return ("rdma", status.reason) if status.available else ("tcp", f"no RDMA: {status.reason}")


def interface_address(name):
    """The IPv4 address of network interface ``name`` (KVCACHE_SOCKET_IFNAME).
    LLM_PARAM_INVALID when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR,
                                 struct.pack("256s", name.encode()[:15]))
        except OSError as exc:
            raise checks.invalid(f"KVCACHE_SOCKET_IFNAME={name!r}: no IPv4 address on that "
                                 f"interface ({exc.strerror})") from None
    return socket.inet_ntoa(packed[20:24])


def _note_unused(transport, role):
    """Log once per process each FastDeploy variable that means nothing
    here (the RDMA ones on another transport)."""
    unused = [n for n in RDMA_ONLY_ENV if env_str(n)] if transport != "rdma" else []
    if transport != "rdma" and role == "prefill" and env_str("KVCACHE_SOCKET_IFNAME"):
        unused.append("KVCACHE_SOCKET_IFNAME")
    for name in unused:
        with _noted_lock:
            if name in _noted:
                continue
            _noted.add(name)
        log.warning("%s has no effect on a %s with the %s transport", name, role, transport)


def _port(port):
    """FastDeploy passes ports as strings; an int is taken too."""
    text = str(port).strip() if isinstance(port, (str, int)) and not isinstance(port, bool) \
        else ""
    if not text.isdigit() or not 0 <= int(text) < 65536:
        raise checks.invalid(f"port must be 0..65535 (a string or an int), got {port!r}")
    return int(text)


def _url(ip, port):
    if not isinstance(ip, str) or not ip.strip():
        raise checks.invalid(f"ip must be a non-empty string, got {ip!r}")
    return ip.strip(), _port(port)


def _base_addresses(bases, what):
    """One base address per layer (ints, as FastDeploy's int64 lists)."""
    if isinstance(bases, (str, bytes)) or not hasattr(bases, "__iter__"):
        raise checks.invalid(f"{what} must be a list of addresses, got {bases!r}")
    return [checks.integer(b, f"{what}[{i}]", 1, (1 << 64) - 1) for i, b in enumerate(bases)]


def _block_ids(ids, what, count):
    """``ids`` as an int64 array, every one in 0..count-1 (LLM_PARAM_INVALID
    naming the first that is not)."""
    try:
        array = np.asarray(ids)
    except (TypeError, ValueError) as exc:
        raise checks.invalid(f"{what}: {exc}") from None
    if array.ndim != 1:
        raise checks.invalid(f"{what} must be a flat list of block ids, got shape "
                             f"{array.shape}")
    if array.size == 0:
        return np.empty(0, dtype=np.int64)
    if array.dtype.kind not in "iu":
        raise checks.invalid(f"{what} must be integers, got {array.dtype} values")
    bad = np.flatnonzero((array < 0) | (array >= count))
    if bad.size:
        i = int(bad[0])
        raise checks.invalid(f"{what}[{i}] = {array[i]} is outside 0..{count - 1} "
                             f"(block_number {count}; {bad.size} such ids)")
    return array.astype(np.int64)


class _Remote:
    """A decoder's caches as it described them at connect."""

    def __init__(self, peer, layout, layers, key_only, block_bytes):
        try:
            self.block_number = int(layout["block_number"])
            self.keys = [(int(a), int(r)) for a, r in layout["keys"]]
            self.values = [(int(a), int(r)) for a, r in layout["values"]]
            remote_bytes = int(layout["block_bytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"malformed cache layout from {peer.name}: {exc!r}") from None
        self.peer = peer
        if len(self.keys) != layers or (not self.values) != key_only or \
                (self.values and len(self.values) != layers):
            raise checks.invalid(
                f"the decoder has {len(self.keys)} layers "
                f"({'key-only' if not self.values else 'key and value'}), we have {layers} "
                f"({'key-only' if key_only else 'key and value'})")
        if remote_bytes != block_bytes or self.block_number < 1:
            raise checks.invalid(f"the decoder's blocks are {remote_bytes} bytes "
                                 f"({self.block_number} of them), ours {block_bytes}")


class RDMACommunicator:
    """FastDeploy's RDMACommunicator (``rdma_comm``), same arguments.

    ``role``: "prefill" (connects, writes) or "decode" (listens on ``port``,
    is written to). ``gpu_idx``: the device index; with RDMA it picks NIC
    ``gpu_idx`` modulo the KVCACHE_RDMA_NICS list. ``port``: the decoder's
    listening port, a string or an int (0: a free one, see ``port``; the
    prefill role ignores it). ``local_key_cache`` / ``local_value_cache``:
    per layer, the base address (int) of that layer's ``block_number``
    blocks of ``block_bytes`` bytes each; an empty value list means a
    key-only (MLA) layout. The memory must be host memory of this process.

    Keywords beyond FastDeploy's: ``transport`` ("rdma", "tcp", "shm",
    "auto"; default KVCACHE_TRANSPORT, else "auto": RDMA where usable, else
    TCP); ``host``: the decoder's listening address (default: the IPv4
    address of KVCACHE_SOCKET_IFNAME, else all interfaces, as FastDeploy);
    ``timeout_ms``: the deadline of one write_cache (default 30 000, as
    FastDeploy's 30 s completion wait); ``connect_timeout_ms``: of connect
    and control calls (default 5 000); ``auth_key``: the shared secret of
    authenticated links (default KVCACHE_AUTH_KEY, see TransferEngine).

    Raises LLMException (LLM_PARAM_INVALID for bad arguments or memory that
    cannot be registered, LLM_FEATURE_NOT_ENABLED when the transport is not
    usable here), as FastDeploy's constructor throws."""

    @public
    def __init__(self, role, gpu_idx, port, local_key_cache, local_value_cache, block_number,
                 block_bytes, *, transport=None, host=None, timeout_ms=30_000,
                 connect_timeout_ms=5000, auth_key=None):
        setup_logging()            # the log files first: what follows may log
        if role not in ("prefill", "decode"):
            raise checks.invalid(f"role must be 'prefill' or 'decode', got {role!r}")
        self.role = role
        self.gpu_idx = checks.integer(gpu_idx, "gpu_idx", 0)
        port = _port(port)
        self._keys = _base_addresses(local_key_cache, "local_key_cache")
        self._values = _base_addresses(local_value_cache, "local_value_cache")
        if not self._keys:
            raise checks.invalid("local_key_cache names no layer")
        if self._values and len(self._values) != len(self._keys):
            raise checks.invalid(f"{len(self._keys)} key layers but {len(self._values)} value "
                                 "layers (an empty value list means key-only)")
        self.block_number = checks.integer(block_number, "block_number", 1, (1 << 31) - 1)
        self.block_bytes = checks.integer(block_bytes, "block_bytes", 1, (1 << 40) - 1)
        self._timeout_ms = checks.timeout_ms(timeout_ms, "timeout_ms")
        self._connect_timeout_ms = checks.timeout_ms(connect_timeout_ms, "connect_timeout_ms")
        self.transport, why = choose_transport(transport)
        _note_unused(self.transport, role)
        listen = None
        if role == "decode":
            ifname = env_str("KVCACHE_SOCKET_IFNAME")
            listen_host = host or (interface_address(ifname) if ifname else "0.0.0.0")
            listen = format_address(listen_host, port)
        self._engine = TransferEngine(
            f"fastdeploy-{role}-{os.getpid()}-{id(self):x}", listen=listen,
            role="decoder" if role == "decode" else "prompt", transport=self.transport,
            timeout_ms=self._connect_timeout_ms, device_id=self.gpu_idx, auth_key=auth_key)
        self._finalizer = weakref.finalize(self, self._engine.close)
        try:
            layer_bytes = self.block_number * self.block_bytes
            # Once, here: never again per connection (FastDeploy registers per link).
            # A prefill's caches are sources only: its decoders never see them.
            offered = role == "decode"
            # FastDeploy's caches are GPU tensors: device memory is found
            # (CUDA) and its blocks staged; host caches move directly.
            self._key_regions = [self._engine.register_memory(
                a, layer_bytes, remote_accessible=offered,
                device=locate_memory(a, layer_bytes)) for a in self._keys]
            self._value_regions = [self._engine.register_memory(
                a, layer_bytes, remote_accessible=offered,
                device=locate_memory(a, layer_bytes)) for a in self._values]
            if role == "decode":
                self._engine.add_handler(LAYOUT_METHOD, self._serve_layout)
        except BaseException:
            self.close()
            raise
        self.port = int(self._engine.address.rsplit(":", 1)[1]) if listen else port
        self._links = {}                    # (ip, port) -> _Remote
        self._lock = threading.Lock()       # one connect at a time
        log.info("RDMACommunicator %s on %s (%s): %d layers%s, %d blocks of %d bytes%s",
                 role, self.transport, why, len(self._keys),
                 "" if self._values else " (key-only)", self.block_number, self.block_bytes,
                 f", listening on {self._engine.address}" if listen else "")

    @property
    def layers(self):
        return len(self._keys)

    @property
    def address(self):
        """Where the decode role listens ("ip:port"), or None."""
        return self._engine.address

    def _serve_layout(self, peer, params):
        return {"block_number": self.block_number, "block_bytes": self.block_bytes,
                "keys": [[a, r] for a, r in zip(self._keys, self._key_regions)],
                "values": [[a, r] for a, r in zip(self._values, self._value_regions)]}

    # --- links ---------------------------------------------------------------------

    def connect(self, ip, port):
        """Link to the decoder listening at ip:port (port a string or an int)
        and learn its caches: layer count, layout (key-only or not) and
        block_bytes must match ours. Returns a ConnStatus: CONNECTED (0; also
        when already connected), TIMEOUT, INVALID_PARAMETERS (bad ip/port, a
        decode role connecting, a mismatched decoder) or ERROR (nothing
        listening, refused, the link failed). Never raises."""
        try:
            return self._connect(ip, port)
        except LLMException as exc:
            log.error("connect to %s:%s: %s", ip, port, exc)
            return (ConnStatus.TIMEOUT if exc.status_code == LLMStatusCode.LLM_TIMEOUT
                    else ConnStatus.INVALID_PARAMETERS
                    if exc.status_code == LLMStatusCode.LLM_PARAM_INVALID
                    else ConnStatus.ERROR)
        except Exception:
            log.exception("connect to %s:%s", ip, port)
            return ConnStatus.ERROR

    def _connect(self, ip, port):
        url = _url(ip, port)
        if self.role != "prefill":
            raise checks.invalid("the decode role is connected to; the prefill role connects")
        with self._lock:
            remote = self._links.get(url)
            if remote is not None and remote.peer.linked:
                return ConnStatus.CONNECTED
            peer = self._engine.connect(format_address(*url), self._connect_timeout_ms)
            try:
                layout = self._engine.call(peer, LAYOUT_METHOD, {}, self._connect_timeout_ms)
                self._links[url] = _Remote(peer, layout, self.layers, not self._values,
                                           self.block_bytes)
            except BaseException:
                self._engine.disconnect(peer, force=True)
                raise
        log.info("connected to %s:%d (%s)", *url, peer.name)
        return ConnStatus.CONNECTED

    def is_connected(self, ip, port):
        """Whether a link to ip:port is up (False once the decoder is gone).
        Never raises."""
        try:
            remote = self._links.get(_url(ip, port))
        except LLMException:
            return False
        return remote is not None and remote.peer.linked

    # --- writes ----------------------------------------------------------------------

    def write_cache(self, ip, port, local_block_ids, remote_block_ids, layer_idx):
        """Write our blocks ``local_block_ids`` of layer ``layer_idx`` (key,
        and value unless key-only) into the decoder's blocks
        ``remote_block_ids`` (equal-length integer lists or arrays) over the
        link made by ``connect``; returns once the bytes landed. Returns
        WriteStatus.OK (0; also for no blocks) or a negative WriteStatus
        (see there). Never raises."""
        started = time.perf_counter()
        try:
            moved = self._write(ip, port, local_block_ids, remote_block_ids, layer_idx)
        except LLMException as exc:
            code = _WRITE_CODES.get(exc.status_code, WriteStatus.FAILED)
            log.error("write_cache to %s:%s, layer %r: %s (%d): %s", ip, port, layer_idx,
                      code.name, code, exc)
            return code
        except Exception:
            log.exception("write_cache to %s:%s, layer %r", ip, port, layer_idx)
            return WriteStatus.FAILED
        log.debug("write_cache to %s:%s, layer %d: %d bytes in %.0f us", ip, port, layer_idx,
                  moved, (time.perf_counter() - started) * 1e6)
        return WriteStatus.OK

    def _write(self, ip, port, local_block_ids, remote_block_ids, layer_idx):
        url = _url(ip, port)
        layer = checks.integer(layer_idx, "layer_idx", 0, self.layers - 1)
        local = _block_ids(local_block_ids, "local_block_ids", self.block_number)
        remote = self._links.get(url)
        if remote is None or not remote.peer.linked:
            raise LLMException(LLMStatusCode.LLM_NOT_YET_LINK,
                               f"not connected to {format_address(*url)}")
        far = _block_ids(remote_block_ids, "remote_block_ids", remote.block_number)
        if local.size != far.size:
            raise checks.invalid(f"{local.size} local block ids but {far.size} remote ones")
        if not local.size:
            return 0
        stride = np.uint64(self.block_bytes)
        local_offsets = local.astype(np.uint64) * stride
        remote_offsets = far.astype(np.uint64) * stride
        pairs = [(self._keys[layer], remote.keys[layer])]
        if self._values:
            pairs.append((self._values[layer], remote.values[layer]))
        sources = np.concatenate([np.uint64(ours) + local_offsets for ours, _ in pairs])
        targets = np.concatenate([np.uint64(addr) + remote_offsets for _, (addr, _) in pairs])
        regions = np.concatenate([np.full(far.size, region, dtype=np.uint64)
                                  for _, (_, region) in pairs])
        return self._engine.transfer_sync(remote.peer, "write", sources, targets,
                                          np.full(sources.size, stride, dtype=np.uint64),
                                          timeout_ms=self._timeout_ms, remote_regions=regions)

    # --- shutdown ------------------------------------------------------------------------

    def close(self):
        """Unlink and stop listening (FastDeploy does this in its destructor;
        garbage collection here does it too). Idempotent."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
