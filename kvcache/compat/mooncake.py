"""``mooncake.engine.TransferEngine`` over kvcache's engine: Mooncake users
switch by changing one import::

    from mooncake.engine import TransferEngine          # before
    from kvcache.compat.mooncake import TransferEngine  # after

Same methods, arguments and return conventions as Mooncake's Python API
(integers: 0 for success, a negative code for failure; batch ids for
asynchronous calls, 0 when submitting failed). A segment is one engine, named
"host:port" (its listen address); ``target_hostname`` names the peer's
segment, and the link to it is made on first use and kept. Memory is
reachable by peers once registered, and nothing is ever read or written
outside registered memory (a bad address is a negative code, not a crash).

Failure codes (Mooncake's error.h names; the LLMException behind each is
logged at WARNING by the ``kvcache.compat.mooncake`` logger):

    -1    ERR_INVALID_ARGUMENT        bad argument, or a failed transfer whose
                                      cause has no code of its own
    -2    ERR_TOO_MANY_REQUESTS       a limit was reached (links, queued requests)
    -3    ERR_ADDRESS_NOT_REGISTERED  a local or remote piece is not inside
                                      registered memory, or the memory to
                                      unregister / free is not registered here
    -4    ERR_BATCH_BUSY              memory still used by transfers in flight
    -6    ERR_DEVICE_NOT_FOUND        the protocol or device is not available
    -7    ERR_ADDRESS_OVERLAPPED      memory overlaps memory registered before
    -8    ERR_TIMEOUT (ours)          the transfer missed its deadline
                                      (MC_TRANSFER_TIMEOUT); none of it lands later
    -101  ERR_DNS_FAIL                the segment name does not resolve: not
                                      "host:port", or not published in etcd
    -102  ERR_SOCKET_FAIL             the link to the segment failed or broke
    -104  ERR_REJECT_HANDSHAKE        the segment refused the link (auth, limits)
    -200  ERR_METADATA                the etcd metadata server failed
    -202  ERR_CONTEXT                 not initialized, or already closed
    -302  ERR_OUT_OF_MEMORY           the managed buffer pool is exhausted

What differs from Mooncake: ``protocol`` may also be "shm" (same host: a
transfer is one memcpy for managed buffers) or "auto" (rdma, else shm);
``close()`` ends the engine (Mooncake relies on the destructor); every call
has a deadline; an unknown segment, unregistered address or dead peer is a
negative code, never a hang or a crash."""
import ctypes
import enum
import functools
import logging
import threading

import numpy as np

from kvcache.bufpool import BufferPool, BufPoolConfig
from kvcache.config import env_int, env_list
from kvcache.descriptors import RegionTable, u64_column
from kvcache.device.engine import TransferEngine as _Engine, parse_device
from kvcache.device.runtime import locate_memory
from kvcache.engine import TRANSPORTS
from kvcache.engine import discovery
from kvcache.engine.address import format_address, parse_address
from kvcache.rdma_support import rdma_status
from kvcache.status import LLMException, LLMStatusCode

log = logging.getLogger(__name__)

OK = 0
ERR_INVALID_ARGUMENT = -1
ERR_TOO_MANY_REQUESTS = -2
ERR_ADDRESS_NOT_REGISTERED = -3
ERR_BATCH_BUSY = -4
ERR_DEVICE_NOT_FOUND = -6
ERR_ADDRESS_OVERLAPPED = -7
ERR_TIMEOUT = -8
ERR_DNS_FAIL = -101
ERR_SOCKET_FAIL = -102
ERR_REJECT_HANDSHAKE = -104
ERR_METADATA = -200
ERR_CONTEXT = -202
ERR_OUT_OF_MEMORY = -302

# The code of an LLMException that no call tagged with a code of its own.
_CODES = {
    LLMStatusCode.LLM_PARAM_INVALID: ERR_INVALID_ARGUMENT,
    LLMStatusCode.LLM_CLUSTER_NUM_EXCEED_LIMIT: ERR_TOO_MANY_REQUESTS,
    LLMStatusCode.LLM_KV_CACHE_NOT_EXIST: ERR_ADDRESS_NOT_REGISTERED,
    LLMStatusCode.LLM_LINK_BUSY: ERR_BATCH_BUSY,
    LLMStatusCode.LLM_FEATURE_NOT_ENABLED: ERR_DEVICE_NOT_FOUND,
    LLMStatusCode.LLM_TIMEOUT: ERR_TIMEOUT,
    LLMStatusCode.LLM_LINK_FAILED: ERR_SOCKET_FAIL,
    LLMStatusCode.LLM_NOT_YET_LINK: ERR_SOCKET_FAIL,
    LLMStatusCode.LLM_ENGINE_FINALIZED: ERR_CONTEXT,
    LLMStatusCode.LLM_OUT_OF_MEMORY: ERR_OUT_OF_MEMORY,
}

P2PHANDSHAKE = discovery.P2P
MANAGED_POOL_BYTES = 64 << 20
DEFAULT_TRANSFER_TIMEOUT_S = 30        # Mooncake's MC_TRANSFER_TIMEOUT default
MAX_PENDING_BATCHES = 4096


class TransferOpcode(enum.IntEnum):
    READ = 0
    WRITE = 1


class TransferNotify:
    """A notification (``name``, ``msg`` strings), sent after a transfer by
    ``transfer_sync`` / ``batch_transfer_sync`` and received by
    ``get_notifies``, as Mooncake's TransferNotify."""

    def __init__(self, name="", msg=""):
        self.name = name
        self.msg = msg

    def __repr__(self):
        return f"TransferNotify({self.name!r}, {self.msg!r})"


def _tagged(code, status, message):
    """An LLMException that reports ``code`` to the Mooncake caller."""
    exc = LLMException(status, message)
    exc.mooncake_code = code
    return exc


def _returns_code(failure=None):
    """Turn an exception into Mooncake's answer: the failure code (or
    ``failure``, for calls that answer an address, a batch id or bytes),
    with the exception logged."""
    def wrap(func):
        @functools.wraps(func)
        def call(self, *args, **kwargs):
            try:
                return func(self, *args, **kwargs)
            except LLMException as exc:
                code = getattr(exc, "mooncake_code", _CODES.get(exc.status_code,
                                                                 ERR_INVALID_ARGUMENT))
                log.warning("%s failed (%d): %s", func.__name__, code, exc)
            except Exception as exc:      # a bad argument of the wrong type, deep inside
                code = ERR_INVALID_ARGUMENT
                log.warning("%s failed (%d): bad argument: %r", func.__name__, code, exc)
            return code if failure is None else failure
        return call
    return wrap


def _split_hostname(text):
    """(host, port) of "host", "host:port" or "[ipv6]:port" (port 0: pick one)."""
    text = str(text).strip()
    if text.rpartition(":")[2].isdigit() and (":" not in text.rpartition(":")[0]
                                             or text.startswith("[")):
        return parse_address(text)
    if not text or text.startswith("["):
        raise _tagged(ERR_INVALID_ARGUMENT, LLMStatusCode.LLM_PARAM_INVALID,
                      f"local_hostname {text!r} is not 'host' or 'host:port'")
    return text, 0


def _choose_transport(protocol):
    if protocol == "auto":
        if "rdma" in TRANSPORTS and rdma_status().available:
            return "rdma"
        return "shm" if "shm" in TRANSPORTS else "tcp"
    if protocol not in TRANSPORTS:
        raise _tagged(ERR_DEVICE_NOT_FOUND, LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
                      f"protocol {protocol!r} not available; have "
                      f"{sorted(TRANSPORTS) + ['auto']}")
    if protocol == "rdma" and not rdma_status().available:
        raise _tagged(ERR_DEVICE_NOT_FOUND, LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
                      f"protocol 'rdma' unavailable: {rdma_status().reason}")
    return protocol


def _device_id(transport, device_name):
    """The engine's device id for Mooncake's ``device_name`` (a comma list of
    RDMA devices; the first is used): its index among KVCACHE_RDMA_NICS, or
    among all devices when that is unset."""
    names = [n for n in str(device_name or "").split(",") if n]
    if transport != "rdma" or not names:
        return 0
    import pyverbs_kv
    devices = env_list("KVCACHE_RDMA_NICS") or list(pyverbs_kv.get_device_list())
    if names[0] not in devices:
        raise _tagged(ERR_DEVICE_NOT_FOUND, LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
                      f"RDMA device {names[0]!r} not found (have {devices})")
    return devices.index(names[0])


class TransferEngine:
    """Mooncake's TransferEngine. ``managed_pool_bytes`` (ours): the size of
    the buffer pool that ``initialize`` registers first (so it is the first
    buffer of the segment) and ``allocate_managed_buffer`` carves; it lives
    in shared memory, so "shm" peers copy it with one memcpy."""

    def __init__(self, managed_pool_bytes=MANAGED_POOL_BYTES):
        self._pool_bytes = managed_pool_bytes
        self._engine = None
        self._pool = None
        self._discovery = None
        self._segment = None
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._peers = {}                   # segment name -> Peer
        self._registered = {}              # user addr -> region id
        self._batches = {}                 # batch id -> TransferRequest
        self._next_batch = 1
        self._timeout_ms = 1000 * DEFAULT_TRANSFER_TIMEOUT_S

    # --- setup -----------------------------------------------------------------------

    @_returns_code()
    def initialize(self, local_hostname, metadata_server, protocol, device_name):
        """Start the segment: listen on ``local_hostname`` ("host" or
        "host:port"; no port or 0 picks one, see ``get_rpc_port``), find
        peers through ``metadata_server`` ("P2PHANDSHAKE": none, segment
        names are addresses; "etcd://host:port" or "host:port": etcd, see
        kvcache.engine.discovery), move bytes with ``protocol`` ("tcp",
        "rdma", "shm", "auto") on ``device_name`` (RDMA devices, comma
        separated; "" picks). The segment is then named "host:port" with the
        port we listen on. Transfers wait MC_TRANSFER_TIMEOUT seconds
        (default 30) at most. Returns 0, or a negative code."""
        if self._engine is not None:
            raise _tagged(ERR_INVALID_ARGUMENT, LLMStatusCode.LLM_REPEAT_REQUEST,
                          "already initialized")
        host, port = _split_hostname(local_hostname)
        transport = _choose_transport(protocol)
        device_id = _device_id(transport, device_name)
        timeout_s = env_int("MC_TRANSFER_TIMEOUT", DEFAULT_TRANSFER_TIMEOUT_S)
        if timeout_s <= 0:
            raise _tagged(ERR_INVALID_ARGUMENT, LLMStatusCode.LLM_PARAM_INVALID,
                          f"MC_TRANSFER_TIMEOUT must be a positive number of seconds, "
                          f"got {timeout_s}")
        self._timeout_ms = 1000 * timeout_s
        try:
            self._discovery = discovery.open_discovery(metadata_server)
        except LLMException as exc:
            code = ERR_METADATA if exc.status_code == LLMStatusCode.LLM_LINK_FAILED else None
            if code is not None:
                exc.mooncake_code = code
            raise
        try:
            self._engine = _Engine(listen=format_address(host, port), transport=transport,
                                   device_id=device_id)
            self._pool = BufferPool(BufPoolConfig(pool_size=self._pool_bytes))
            self._engine.register_memory(self._pool.base, self._pool.size,
                                         share=(self._pool.memory.fd, 0))
            self._segment = format_address(host, parse_address(self._engine.address)[1])
            self._publish()
        except BaseException:
            self.close()
            raise
        log.info("segment %s: %s, metadata %s", self._segment, transport,
                 metadata_server or P2PHANDSHAKE)
        return OK

    def _started(self):
        if self._engine is None:
            raise _tagged(ERR_CONTEXT, LLMStatusCode.LLM_ENGINE_FINALIZED,
                          "TransferEngine is not initialized (or closed)")
        return self._engine

    def _publish(self):
        """Our segment record in etcd (nothing to do peer-to-peer)."""
        if not self._discovery.uses_server:
            return
        engine = self._engine
        record = {"name": self._segment, "listen": engine.address,
                  "transport": engine.transport.name,
                  "regions": [list(r) for r in engine.regions() + engine.device_regions()],
                  "cluster_id": engine.cluster_id, "role": engine.role}
        try:
            self._discovery.publish(discovery.segment_key(self._segment), record)
        except LLMException as exc:
            exc.mooncake_code = ERR_METADATA
            raise

    @_returns_code()
    def get_rpc_port(self):
        """The port this segment listens on."""
        return parse_address(self._started().address)[1]

    def get_local_segment_name(self):
        """Our segment name, "host:port" (ours; Mooncake users build it from
        local_hostname and get_rpc_port). None before initialize."""
        return self._segment

    def close(self):
        """Withdraw the segment, unlink every peer, free the managed pool
        (ours: Mooncake ends with the object). Idempotent."""
        with self._lock:
            engine, self._engine = self._engine, None
            self._peers.clear()
            self._batches.clear()
        if engine is not None:
            engine.close()
        if self._discovery is not None:
            self._discovery.close()
            self._discovery = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- memory ----------------------------------------------------------------------

    @_returns_code()
    def register_memory(self, buffer_addr, capacity, location="*"):
        """Make [buffer_addr, +capacity bytes) reachable by peers. 0, -7
        when it overlaps memory registered before, -1 for memory that is not
        mapped here. ``location`` (Mooncake's registerLocalMemory location):
        "*" finds it (CUDA device memory, else host memory; see
        kvcache.device.runtime.locate_memory), "cpu" or "cpu:N" is host
        memory, "cuda:N" / "npu:N" device memory, whose transfers are
        staged through pinned host buffers."""
        self._register(buffer_addr, capacity, location)
        self._publish()
        return OK

    def _register(self, addr, length, location="*"):
        engine = self._started()
        addr, length = int(addr), int(length)
        if location == "*":
            device = locate_memory(addr, length)
        elif str(location).partition(":")[0] == "cpu":
            device = None
        else:
            device = "{}:{}".format(*parse_device(location))
        for _, start, size in engine.regions() + engine.device_regions():
            if start < addr + length and addr < start + size:
                raise _tagged(ERR_ADDRESS_OVERLAPPED, LLMStatusCode.LLM_PARAM_INVALID,
                              f"[{addr:#x}, +{length}) overlaps registered "
                              f"[{start:#x}, +{size})")
        region_id = engine.register_memory(addr, length, device=device)
        with self._lock:
            self._registered[addr] = region_id

    @_returns_code()
    def unregister_memory(self, buffer_addr):
        """Withdraw memory registered at ``buffer_addr`` (-3 if none is;
        -4 while transfers still use it)."""
        self._unregister([int(buffer_addr)])
        self._publish()
        return OK

    @_returns_code()
    def batch_register_memory(self, buffer_addresses, capacities):
        """register_memory for each pair; all or none (memory registered
        before a failure is withdrawn again)."""
        addrs, lengths = list(buffer_addresses), list(capacities)
        if len(addrs) != len(lengths):
            raise _tagged(ERR_INVALID_ARGUMENT, LLMStatusCode.LLM_PARAM_INVALID,
                          f"{len(addrs)} addresses but {len(lengths)} capacities")
        done = []
        try:
            for addr, length in zip(addrs, lengths):
                self._register(addr, length)
                done.append(int(addr))
        except BaseException:
            if done:
                self._unregister(done)
            raise
        self._publish()
        return OK

    @_returns_code()
    def batch_unregister_memory(self, buffer_addresses):
        """unregister_memory for each address; all or none."""
        self._unregister([int(a) for a in buffer_addresses])
        self._publish()
        return OK

    def _unregister(self, addrs):
        engine = self._started()
        with self._lock:
            unknown = [a for a in addrs if a not in self._registered]
            if unknown:
                raise _tagged(ERR_ADDRESS_NOT_REGISTERED, LLMStatusCode.LLM_PARAM_INVALID,
                              f"not registered here: {[hex(a) for a in unknown]}")
            ids = [self._registered[a] for a in addrs]
        engine.unregister_memory(ids, timeout_ms=self._timeout_ms)
        with self._lock:
            for addr in addrs:
                self._registered.pop(addr, None)

    @_returns_code(failure=0)
    def allocate_managed_buffer(self, length):
        """An address of ``length`` bytes in the managed pool (registered
        already), or 0 when the pool cannot serve it."""
        self._started()
        return self._pool.alloc(length)

    @_returns_code()
    def free_managed_buffer(self, buffer_addr, length):
        """Give back a buffer from allocate_managed_buffer (-3 if it is not
        one, or ``length`` exceeds it)."""
        self._started()
        addr = int(buffer_addr)
        try:
            size = self._pool.allocation_size(addr)
        except KeyError:
            size = -1
        if size < int(length):
            raise _tagged(ERR_ADDRESS_NOT_REGISTERED, LLMStatusCode.LLM_PARAM_INVALID,
                          f"{addr:#x} (+{int(length)}) is not a managed buffer")
        self._pool.free(addr)
        return OK

    def _check_local(self, addrs, lengths, device=True):
        """Every piece inside memory registered here (host memory only
        unless ``device``), else -3."""
        engine = self._started()
        table = RegionTable(engine.regions() + (engine.device_regions() if device else []))
        _, misses = table.locate(u64_column(addrs, "buffers"), u64_column(lengths, "lengths"))
        if misses:
            raise _tagged(ERR_ADDRESS_NOT_REGISTERED, LLMStatusCode.LLM_PARAM_INVALID,
                          f"{misses} local piece(s) not inside registered memory")

    @_returns_code()
    def write_bytes_to_buffer(self, dest_address, src_ptr, length):
        """Copy the first ``length`` bytes of ``src_ptr`` (bytes-like) to
        ``dest_address`` in registered host memory (-3 outside it, device
        memory included: the CPU cannot touch it)."""
        data = memoryview(src_ptr).cast("B")
        length = int(length)
        if not 0 < length <= data.nbytes:
            raise _tagged(ERR_INVALID_ARGUMENT, LLMStatusCode.LLM_PARAM_INVALID,
                          f"length {length} outside 1..{data.nbytes} (the data's size)")
        self._check_local([dest_address], [length], device=False)   # the CPU writes it
        ctypes.memmove(int(dest_address), np.frombuffer(data, np.uint8).ctypes.data, length)
        return OK

    @_returns_code(failure=b"")
    def read_bytes_from_buffer(self, source_address, length):
        """``length`` bytes at ``source_address`` in registered host memory,
        as bytes; b"" (logged) when the range is not registered host memory
        here."""
        self._check_local([source_address], [length], device=False)
        return ctypes.string_at(int(source_address), int(length))

    @_returns_code(failure=0)
    def get_first_buffer_address(self, segment_name):
        """The address of the first buffer registered in a segment (ours or
        a peer's: the managed pool unless memory was registered before it),
        or 0 when the segment is unknown or has none."""
        if segment_name == self._segment:
            rows = self._started().regions()
        elif self._discovery.uses_server:
            rows = self._record(segment_name)["regions"]
        else:
            peer = self._peer(segment_name)
            self._engine.refresh_regions(peer)
            rows = peer.regions.as_list()
        return int(min(rows)[1]) if rows else 0

    # --- links -----------------------------------------------------------------------

    def _record(self, segment_name):
        try:
            record = self._discovery.resolve(discovery.segment_key(segment_name))
        except LLMException as exc:
            exc.mooncake_code = ERR_METADATA
            raise
        if record is None:
            raise _tagged(ERR_DNS_FAIL, LLMStatusCode.LLM_PARAM_INVALID,
                          f"segment {segment_name!r} is not published at "
                          f"{self._discovery.endpoint}")
        return record

    def _peer(self, segment_name):
        """The link to a segment, made on first use (and again after it failed)."""
        engine = self._started()
        if not isinstance(segment_name, str):
            raise _tagged(ERR_INVALID_ARGUMENT, LLMStatusCode.LLM_PARAM_INVALID,
                          f"segment name must be a string, got {segment_name!r}")
        with self._connect_lock:
            peer = self._peers.get(segment_name)
            if peer is not None and peer.linked:
                return peer
            if self._discovery.uses_server:
                address = self._record(segment_name)["listen"]
            else:
                try:
                    address = format_address(*parse_address(segment_name))
                except LLMException as exc:
                    exc.mooncake_code = ERR_DNS_FAIL
                    raise
            try:
                peer = engine.connect(address, timeout_ms=min(self._timeout_ms, 10_000))
            except LLMException as exc:
                if exc.status_code not in (LLMStatusCode.LLM_LINK_FAILED,
                                           LLMStatusCode.LLM_TIMEOUT):
                    exc.mooncake_code = ERR_REJECT_HANDSHAKE
                else:
                    exc.mooncake_code = ERR_SOCKET_FAIL
                raise
            self._peers[segment_name] = peer
            return peer

    @_returns_code()
    def send_probe(self, peer_server_name):
        """0 when the segment answers (its link is made if needed)."""
        peer = self._peer(peer_server_name)
        self._engine.refresh_regions(peer)
        return OK

    # --- transfers -------------------------------------------------------------------

    def _prepare(self, target, buffers, peer_addresses, lengths):
        """(peer, local, remote, lengths) checked: local pieces inside our
        registered memory and remote ones inside the peer's (else -3)."""
        local = u64_column(buffers, "buffers")
        remote = u64_column(peer_addresses, "peer buffer addresses")
        sizes = u64_column(lengths, "lengths")
        if not local.size == remote.size == sizes.size:
            raise _tagged(ERR_INVALID_ARGUMENT, LLMStatusCode.LLM_PARAM_INVALID,
                          f"{local.size} buffers, {remote.size} peer addresses, "
                          f"{sizes.size} lengths")
        self._check_local(local, sizes)
        peer = self._peer(target)
        if self._engine.locate_remote(peer, remote, sizes, self._timeout_ms)[2]:
            raise _tagged(ERR_ADDRESS_NOT_REGISTERED, LLMStatusCode.LLM_PARAM_INVALID,
                          f"remote piece(s) not inside memory {target} registered")
        return peer, local, remote, sizes

    def _sync(self, op, target, buffers, peer_addresses, lengths, notify=None):
        peer, local, remote, sizes = self._prepare(target, buffers, peer_addresses, lengths)
        if local.size:
            self._engine.transfer_sync(peer, op, local, remote, sizes,
                                       timeout_ms=self._timeout_ms)
        if notify is not None:
            self._engine.notify(peer, str(notify.name), str(notify.msg).encode(),
                                timeout_ms=self._timeout_ms)
        return OK

    @_returns_code()
    def transfer_sync_write(self, target_hostname, buffer, peer_buffer_address, length):
        """Write ``length`` bytes at local ``buffer`` to the segment's
        ``peer_buffer_address``; returns once they landed. 0 or a code."""
        return self._sync("write", target_hostname, [buffer], [peer_buffer_address], [length])

    @_returns_code()
    def transfer_sync_read(self, target_hostname, buffer, peer_buffer_address, length):
        """Read ``length`` bytes at the segment's ``peer_buffer_address``
        into local ``buffer``. 0 or a code."""
        return self._sync("read", target_hostname, [buffer], [peer_buffer_address], [length])

    @_returns_code()
    def transfer_sync(self, target_hostname, buffer, peer_buffer_address, length, opcode,
                      notify=None):
        """transfer_sync_write/read by ``opcode`` (TransferOpcode), then
        ``notify`` (a TransferNotify) delivered to the segment."""
        return self._sync(_op(opcode), target_hostname, [buffer], [peer_buffer_address],
                          [length], notify)

    @_returns_code()
    def batch_transfer_sync_write(self, target_hostname, buffers, peer_buffer_addresses,
                                  lengths):
        """Write piece i: lengths[i] bytes from buffers[i] to
        peer_buffer_addresses[i] (lists of equal length). 0 or a code."""
        return self._sync("write", target_hostname, buffers, peer_buffer_addresses, lengths)

    @_returns_code()
    def batch_transfer_sync_read(self, target_hostname, buffers, peer_buffer_addresses,
                                 lengths):
        """Read piece i into buffers[i] (see batch_transfer_sync_write)."""
        return self._sync("read", target_hostname, buffers, peer_buffer_addresses, lengths)

    @_returns_code()
    def batch_transfer_sync(self, target_hostname, buffers, peer_buffer_addresses, lengths,
                            opcode, notify=None):
        """batch_transfer_sync_write/read by ``opcode``, then ``notify``."""
        return self._sync(_op(opcode), target_hostname, buffers, peer_buffer_addresses,
                          lengths, notify)

    def _submit(self, op, target, buffers, peer_addresses, lengths):
        peer, local, remote, sizes = self._prepare(target, buffers, peer_addresses, lengths)
        with self._lock:
            if len(self._batches) >= MAX_PENDING_BATCHES:
                raise _tagged(ERR_TOO_MANY_REQUESTS, LLMStatusCode.LLM_PARAM_INVALID,
                              f"{MAX_PENDING_BATCHES} batches not collected yet "
                              "(get_batch_transfer_status / transfer_check_status)")
        request = self._engine.transfer_async(peer, op, local, remote, sizes,
                                              timeout_ms=self._timeout_ms)
        with self._lock:
            batch_id = self._next_batch
            self._next_batch += 1
            self._batches[batch_id] = request
        return batch_id

    @_returns_code(failure=0)
    def batch_transfer_async_write(self, target_hostname, buffers, peer_buffer_addresses,
                                   lengths):
        """Start batch_transfer_sync_write; returns its batch id (> 0), or 0
        when it could not be submitted. Collect it with
        get_batch_transfer_status."""
        return self._submit("write", target_hostname, buffers, peer_buffer_addresses, lengths)

    @_returns_code(failure=0)
    def batch_transfer_async_read(self, target_hostname, buffers, peer_buffer_addresses,
                                  lengths):
        """Start batch_transfer_sync_read; its batch id, or 0."""
        return self._submit("read", target_hostname, buffers, peer_buffer_addresses, lengths)

    @_returns_code(failure=0)
    def batch_transfer_async(self, target_hostname, buffers, peer_buffer_addresses, lengths,
                             opcode):
        """batch_transfer_async_write/read by ``opcode``."""
        return self._submit(_op(opcode), target_hostname, buffers, peer_buffer_addresses,
                            lengths)

    @_returns_code()
    def transfer_submit_write(self, target_hostname, buffer, peer_buffer_address, length):
        """Start transfer_sync_write; its batch id (> 0), or a negative code.
        Poll it with transfer_check_status."""
        return self._submit("write", target_hostname, [buffer], [peer_buffer_address],
                            [length])

    @_returns_code()
    def get_batch_transfer_status(self, batch_ids):
        """Wait for every batch in ``batch_ids`` (each at most
        MC_TRANSFER_TIMEOUT) and forget them: 0 when all succeeded, else the
        code of the first that failed (-1 for an unknown id)."""
        with self._lock:
            requests = [self._batches.pop(int(i), None) for i in batch_ids]
        result = OK
        for batch_id, request in zip(batch_ids, requests):
            code = ERR_INVALID_ARGUMENT if request is None else _wait(request, batch_id)
            if code != OK and result == OK:
                result = code
        return result

    @_returns_code()
    def transfer_check_status(self, batch_id):
        """1 done, 0 still running, -1 failed, -2 timed out (a finished
        batch is forgotten once reported). -1 for an unknown id."""
        with self._lock:
            request = self._batches.get(int(batch_id))
        if request is None:
            return -1
        state = request.status()
        if state == "pending":
            return 0
        with self._lock:
            self._batches.pop(int(batch_id), None)
        code = _wait(request, batch_id)
        return 1 if code == OK else -2 if code == ERR_TIMEOUT else -1

    # --- notifications ---------------------------------------------------------------

    def get_notifies(self):
        """Notifications received since the last call: [TransferNotify]."""
        if self._engine is None:
            return []
        return [TransferNotify(name, bytes(message).decode("utf-8", "replace"))
                for _, name, message in self._engine.get_notifications()]


def _op(opcode):
    try:
        return "write" if TransferOpcode(opcode) == TransferOpcode.WRITE else "read"
    except ValueError:
        raise _tagged(ERR_INVALID_ARGUMENT, LLMStatusCode.LLM_PARAM_INVALID,
                      f"opcode must be TransferOpcode.READ or WRITE, got {opcode!r}") from None


def _wait(request, batch_id):
    """0 once ``request`` succeeded, else its code (logged)."""
    try:
        request.wait()
        return OK
    except LLMException as exc:
        code = _CODES.get(exc.status_code, ERR_INVALID_ARGUMENT)
        log.warning("batch %s failed (%d): %s", batch_id, code, exc)
        return code
