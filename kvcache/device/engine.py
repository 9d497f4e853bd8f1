"""TransferEngine with device memory: the one-sided engine of
kvcache.engine, whose memory may also lie on an accelerator.

    engine = TransferEngine("decode-0", listen="127.0.0.1:26001")
    region = engine.register_memory(tensor.data_ptr(), nbytes, device="cuda:0")

Transports move host bytes only, so a piece of device memory, ours or a
peer's, takes the staged path (kvcache.device.staging: device -> pinned slot
-> the move -> pinned slot -> device, the side holding the memory doing its
copies and checking every piece against its region). Pieces in host memory
on both sides go straight to the host engine. A peer learns our offered
device regions by the control call ``engine.device_regions``, asked only
when a piece lies in none of the regions it knows."""
import contextlib
import threading
import types
import weakref

import numpy as np

from kvcache import checks
from kvcache.checks import public
from kvcache.descriptors import NO_REGION, RegionTable, as_descriptor_arrays, u64_column
from kvcache.device.caches import DeviceCaches, DeviceConfig
from kvcache.device.regions import FIRST_ID
from kvcache.device.runtime import DEVICE_TYPES
from kvcache.device.staging import Deadline
from kvcache.engine.engine import TransferEngine as HostEngine
from kvcache.status import LLMException, LLMStatusCode

DEVICE_REGIONS = "engine.device_regions"


def parse_device(device):
    """'cuda', 'cuda:1', 'npu:0' -> (device type, device id);
    LLM_PARAM_INVALID for anything else."""
    kind, _, index = str(device).partition(":")
    try:
        device_id = int(index) if index else 0
    except ValueError:
        device_id = -1
    if kind not in DEVICE_TYPES or device_id < 0:
        raise checks.invalid(f"device must be one of {DEVICE_TYPES} with an optional ':id' "
                             f"(e.g. 'cuda:0'), got {device!r}")
    return kind, device_id


def _planned_in(region_ids):
    """Our device pieces' regions at planning, as the stager's ``own``
    check takes them (a cache's region_ids): memory freed and registered
    again since is refused."""
    return types.SimpleNamespace(region_ids=set(region_ids.tolist()))


class TransferEngine(HostEngine):
    """kvcache.engine's TransferEngine (same arguments), plus
    ``device_chunk_size``: bytes of each pinned staging slot (default
    KVCACHE_DEVICE_CHUNK_BYTES, 4 MiB). The device runtime is opened at
    the first device registration or the first staging call a peer makes."""

    @public
    def __init__(self, *args, device_chunk_size=None, **kwargs):
        super().__init__(*args, **kwargs)
        try:
            self.device = DeviceCaches(self, DeviceConfig(chunk_bytes=device_chunk_size),
                                       move=super().transfer_sync)
            self.rpc.serve(DEVICE_REGIONS, self._rpc_device_regions, {})
        except BaseException:
            super().close()
            raise
        self._tables = weakref.WeakKeyDictionary()   # Peer -> RegionTable of its device regions
        self._tables_lock = threading.Lock()
        # Device registration against close: no runtime is opened once closing began.
        self._device_lock = threading.Lock()
        self._device_closed = False

    # --- memory ----------------------------------------------------------------------

    @public
    def register_memory(self, addr, length, *, device=None, remote_accessible=True,
                        **host_options):
        """Register [addr, addr + length) for transfers; returns its region id.
        ``device``: None (host memory: every option of the host engine's
        register_memory applies), or 'cuda[:id]' / 'npu[:id]' for device
        memory, such as a torch CUDA tensor's ``data_ptr()`` (as NIXL's
        VRAM descriptors and Mooncake's cuda location). One device per
        engine. CUDA checks both ends of the range with
        cudaPointerGetAttributes. ``remote_accessible`` as for host memory.
        LLM_PARAM_INVALID (a bad device, a range that is no device memory or
        overlaps device memory registered already),
        LLM_FEATURE_NOT_ENABLED (the runtime library is missing)."""
        if device is None:
            return super().register_memory(addr, length, remote_accessible=remote_accessible,
                                           **host_options)
        if host_options:
            raise checks.invalid(f"device memory takes none of {sorted(host_options)}")
        device_type, device_id = parse_device(device)
        addr = checks.integer(addr, "addr", 1)
        length = checks.integer(length, "length", 1)
        with self._device_lock:
            if self._device_closed:
                raise LLMException(LLMStatusCode.LLM_ENGINE_FINALIZED, "engine closed")
            self.device.use(device_type, device_id)
            return self.device.register([addr], length, bool(remote_accessible))[0]

    @public
    def unregister_memory(self, region_ids, timeout_ms=None):
        """As the host engine's, for host and device regions alike, all or
        none: the device regions are withdrawn and waited for first, then
        the host ones released; when either is still in use at the deadline
        of ``timeout_ms`` (LLM_LINK_BUSY) every region stays registered."""
        deadline = Deadline(self._timeout(timeout_ms), "unregister_memory")
        many = isinstance(region_ids, (list, tuple))
        ids = [checks.integer(i, "region id", 1) for i in (region_ids if many else [region_ids])]
        device = [i for i in ids if i >= FIRST_ID]
        unknown = [i for i in device if i not in self.device.regions]
        if unknown:
            raise checks.invalid(f"device regions {unknown} are not registered")
        host = [i for i in ids if i < FIRST_ID]

        def release_host():
            if host:
                super(TransferEngine, self).unregister_memory(host, deadline.left())

        if device:
            self.device.release(device, deadline.left(), then=release_host)
        else:
            release_host()

    def device_regions(self):
        """[(region_id, addr, length)] of the device memory we offer to peers."""
        return self.device.regions.rows()

    def _rpc_device_regions(self, peer, params):
        return {"regions": [list(r) for r in self.device.regions.rows()]}

    # --- transfers -------------------------------------------------------------------

    @public
    def transfer_sync(self, peer, op, local_addrs, remote_addrs, lengths, timeout_ms=None,
                      remote_regions=None):
        """As the host engine's transfer_sync (arguments, return value and
        status codes), where pieces may lie in device memory on either side.
        Those are staged: when this returns, every byte is in place, in the
        target's device memory included. Pieces are grouped by where they
        lie (host or device, here and there) and each group moves under
        the one deadline of ``timeout_ms``; the regions of every piece, ours
        and the peer's host ones, stay pinned until the last group ended.
        ``remote_regions``: the peer's region of each piece, host or device
        ids alike. (The host engine's transfer_async runs this one.)"""
        peer = self.peer(peer)
        local, remote, lengths, total = as_descriptor_arrays(local_addrs, remote_addrs, lengths)
        named = None
        if remote_regions is not None:
            named = u64_column(remote_regions, "remote_regions")
            if named.size != local.size:
                raise checks.invalid("remote_regions must name one region per piece")
        deadline = Deadline(self._timeout(timeout_ms), f"{op} with {peer.name}")
        stager = self.device.stager
        local_ids = self.device.regions.find(local, lengths)
        if named is not None:
            remote_device, remote_ids = named >= FIRST_ID, named
        else:
            remote_device, remote_ids, _ = self._locate_remote(peer, remote, lengths, deadline)
        if ((local_ids is None or not (local_ids != NO_REGION).any())
                and not remote_device.any()):
            stager.transfer(peer, op, local, remote, lengths, deadline.left(),
                            remote_regions=named)
            return total
        if local_ids is None:
            local_ids = np.full(local.size, NO_REGION, dtype=np.uint64)
        local_device = local_ids != NO_REGION
        with self._pinned(peer, local, remote, lengths, named, local_ids, local_device,
                          remote_device, deadline):
            for here in (False, True):
                for there in (False, True):
                    group = (local_device == here) & (remote_device == there)
                    if group.any():
                        self._move_group(peer, op, local[group], remote[group], lengths[group],
                                         local_ids[group] if here else None,
                                         None if there or named is None else named[group],
                                         remote_ids[group] if there else None, deadline)
        return total

    def _move_group(self, peer, op, local, remote, lengths, local_ids, named, remote_ids,
                    deadline):
        own = None if local_ids is None else _planned_in(local_ids)
        try:
            self.device.stager.transfer(peer, op, local, remote, lengths, deadline.left(),
                                        local_cache=own, remote_regions=named,
                                        remote_device_regions=remote_ids)
        except LLMException as exc:
            if remote_ids is not None and exc.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST:
                with self._tables_lock:
                    self._tables.pop(peer, None)         # look its regions up again
            raise

    @contextlib.contextmanager
    def _pinned(self, peer, local, remote, lengths, named, local_ids, local_device,
                remote_device, deadline):
        """Pin, for a whole staged transfer, our host and device regions and
        the peer's host regions its pieces touch (each chunk pins them again
        while it moves): releasing one waits for the transfer, so no chunk
        finds other memory registered at the same addresses meanwhile."""
        host_pins = device_pins = remote_pins = None
        try:
            mine = ~local_device
            if mine.any():
                _, host_pins = self.registry.pin_local(local[mine], lengths[mine])
            if local_device.any():
                device_pins = self.device.regions.pin(local[local_device],
                                                      lengths[local_device], None,
                                                      _planned_in(local_ids[local_device]))
            theirs = ~remote_device
            if theirs.any():
                _, remote_pins = self._pin_remote(peer, remote[theirs], lengths[theirs],
                                                  None if named is None else named[theirs],
                                                  deadline.left())
            yield
        finally:
            if host_pins is not None:
                self.registry.unpin(host_pins)
            if device_pins is not None:
                self.device.regions.unpin(device_pins)
            if remote_pins is not None:
                peer.unpin_remote(remote_pins)

    @public
    def locate_remote(self, peer, remote, lengths, timeout_ms=None):
        """Where the peer's pieces lie: (bool array, True for a piece in its
        device memory; uint64 array, that piece's device region id; the
        count of pieces in none of its memory we know). Our copies of its
        tables are asked for again only for pieces they do not cover: the
        host table first, then the device table (a peer whose engine has
        no device memory has an empty one)."""
        peer = self.peer(peer)
        deadline = Deadline(self._timeout(timeout_ms), f"looking up {peer.name}'s memory")
        return self._locate_remote(peer, u64_column(remote, "remote addresses"),
                                   u64_column(lengths, "lengths"), deadline)

    def _locate_remote(self, peer, remote, lengths, deadline):
        device = np.zeros(remote.size, dtype=bool)
        ids = np.zeros(remote.size, dtype=np.uint64)
        found, misses = peer.regions.locate(remote, lengths)
        if not misses:
            return device, ids, 0
        out = np.flatnonzero(found == NO_REGION)
        with self._tables_lock:
            table = self._tables.get(peer)
        got, missed = (table.locate(remote[out], lengths[out]) if table is not None
                       else (np.full(out.size, NO_REGION, dtype=np.uint64), out.size))
        if missed:
            # New memory of the peer: host memory first (the common case).
            self.refresh_regions(peer, deadline.left())
            found, misses = peer.regions.locate(remote, lengths)
            out = np.flatnonzero(found == NO_REGION)
            got, missed = self.device_table(peer, True, deadline.left()).locate(
                remote[out], lengths[out])
        device[out], ids[out] = got != NO_REGION, got
        return device, ids, missed

    @public
    def device_table(self, peer, refresh=False, timeout_ms=None):
        """Our copy of the device memory ``peer`` offers (a RegionTable),
        asked for at the first call and again with ``refresh``; empty for
        a peer whose engine takes no device memory (kvcache.engine's).
        LLM_FAILED when the peer describes it badly."""
        peer = self.peer(peer)
        timeout = self._timeout(timeout_ms)
        with self._tables_lock:
            table = self._tables.get(peer)
        if table is not None and not refresh:
            return table
        try:
            rows = self._call(peer, DEVICE_REGIONS, {}, timeout).get("regions")
        except LLMException as exc:
            # The host engine serves no such call: no device memory there.
            if "unknown method" not in str(exc):
                raise
            rows = []
        try:
            table = RegionTable((int(i), int(a), int(n)) for i, a, n in rows)
            if (table.ids < FIRST_ID).any():
                raise ValueError("a device region id below FIRST_ID")
        except (TypeError, ValueError, OverflowError, LLMException) as exc:
            raise LLMException(LLMStatusCode.LLM_FAILED,
                               f"{peer.name} described its device regions badly: "
                               f"{exc}") from None
        with self._tables_lock:
            self._tables[peer] = table
        return table

    def transfer_path(self, peer):
        """'staged' or 'host': the path the last transfer with ``peer``
        (a Peer or its name) took; None before its first."""
        return self.device.stager.path(self.peer(peer).name)

    # --- shutdown --------------------------------------------------------------------

    def close(self):
        """Stop staging (waiting for staged transfers and the peers' stage
        calls up to the engine's timeout) and close the device runtime,
        then the host engine. Idempotent."""
        device = getattr(self, "device", None)
        if device is None:                  # a failed __init__
            super().close()
            return
        with self._device_lock:
            self._device_closed = True
        # Staging first: its slots are host regions of the engine, freed while it is open.
        device.close()
        super().close()
