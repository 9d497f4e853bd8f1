"""The buffer pool: one shareable memory region (registered once with every
transport), carved by LLM-DataDist-style tiers for small buffers and a
coalescing first-fit allocator for large ones.

``buf_pool_cfg`` is JSON: {"buf_cfg": [{"total_size", "blk_size",
"max_buf_size"}, ...], "buf_pool_size": N}. Tier rules (as LLM-DataDist
documents them): total_size a multiple of 2 MiB and of blk_size, at most
0xFFFFFFFF; blk_size a power of two in (0, 2 MiB] and <= max_buf_size;
max_buf_size < total_size and strictly increasing from tier to tier.
buf_pool_size (ours) is the whole pool; what the tiers do not take serves
large allocations. The tiers sit at the start of the pool."""
import bisect
import ctypes
import fcntl
import json
import mmap
import os
import resource
import threading

import numpy as np

from kvcache.status import LLMException, LLMStatusCode

MiB = 1 << 20
DEFAULT_POOL_SIZE = 1 << 30          # 1538 blocks of 256 KiB fit with room to spare
LARGE_ALIGN = 4096
_TIER_LIMIT = 0xFFFFFFFF


def _invalid(message):
    return LLMException(LLMStatusCode.LLM_PARAM_INVALID, f"buf_pool_cfg: {message}")


class BufPoolConfig:
    """Validated pool configuration: ``tiers`` is a list of
    (total_size, blk_size, max_buf_size); ``pool_size`` the whole pool."""

    def __init__(self, tiers=(), pool_size=DEFAULT_POOL_SIZE):
        self.tiers = [tuple(int(v) for v in t) for t in tiers]
        self.pool_size = int(pool_size)
        self._validate()

    @classmethod
    def parse(cls, text):
        """From the JSON text of LLMConfig.buf_pool_cfg ('' or None: defaults)."""
        if text is None or text == "":
            return cls()
        try:
            cfg = json.loads(text) if isinstance(text, (str, bytes)) else dict(text)
        except (ValueError, TypeError) as exc:
            raise _invalid(f"not valid JSON ({exc})") from None
        if not isinstance(cfg, dict):
            raise _invalid("must be a JSON object")
        unknown = set(cfg) - {"buf_cfg", "buf_pool_size"}
        if unknown:
            raise _invalid(f"unknown keys {sorted(unknown)}")
        tiers = []
        for i, tier in enumerate(cfg.get("buf_cfg", [])):
            if not isinstance(tier, dict) or set(tier) != {"total_size", "blk_size",
                                                            "max_buf_size"}:
                raise _invalid(f"buf_cfg[{i}] needs exactly total_size, blk_size, max_buf_size")
            values = [tier["total_size"], tier["blk_size"], tier["max_buf_size"]]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise _invalid(f"buf_cfg[{i}] values must be integers")
            tiers.append(tuple(values))
        size = cfg.get("buf_pool_size", DEFAULT_POOL_SIZE)
        if not isinstance(size, int) or isinstance(size, bool):
            raise _invalid("buf_pool_size must be an integer")
        return cls(tiers, size)

    def _validate(self):
        previous_max = 0
        for i, (total, blk, max_buf) in enumerate(self.tiers):
            where = f"buf_cfg[{i}]"
            if blk <= 0 or blk > 2 * MiB or blk & (blk - 1):
                raise _invalid(f"{where}.blk_size {blk} must be a power of two in (0, 2 MiB]")
            if total <= 0 or total % (2 * MiB) or total % blk or total > _TIER_LIMIT:
                raise _invalid(f"{where}.total_size {total} must be a positive multiple of "
                               f"2 MiB and of blk_size, at most {_TIER_LIMIT:#x}")
            if not blk <= max_buf < total:
                raise _invalid(f"{where}.max_buf_size {max_buf} must be >= blk_size {blk} "
                               f"and < total_size {total}")
            if max_buf <= previous_max:
                raise _invalid(f"{where}.max_buf_size {max_buf} must be larger than the "
                               f"previous tier's {previous_max}")
            previous_max = max_buf
        tiers_total = sum(t[0] for t in self.tiers)
        if self.pool_size <= 0 or self.pool_size % LARGE_ALIGN:
            raise _invalid(f"buf_pool_size {self.pool_size} must be a positive multiple of "
                           f"{LARGE_ALIGN}")
        if tiers_total > self.pool_size:
            raise _invalid(f"the tiers take {tiers_total} bytes, more than buf_pool_size "
                           f"{self.pool_size}")


_MADV_POPULATE_WRITE = 23        # Linux 5.14+
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def populate(addr, length):
    """Fault the pages of [addr, addr + length) in now, so the first transfer
    into a new cache does not pay for page faults (they cost more than the
    copy). Uses MADV_POPULATE_WRITE, or touches every page where the kernel
    lacks it (the contents of a new allocation are undefined either way)."""
    page = mmap.PAGESIZE
    start = addr - addr % page
    end = -(-(addr + length) // page) * page
    if _libc.madvise(start, end - start, _MADV_POPULATE_WRITE) == 0:
        return
    view = (ctypes.c_uint8 * length).from_address(addr)
    np.frombuffer(view, dtype=np.uint8)[::page] = 0


_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10                    # Linux; the mmap module does not export it


def _map_fixed(addr, size, fd, offset):
    """Replace the pages of [addr, addr + size) by a shared mapping of ``fd``
    at ``offset`` (MAP_FIXED: the range stays mapped throughout)."""
    got = _libc.mmap(addr, size, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_SHARED | _MAP_FIXED, fd, offset)
    if got == _MAP_FAILED or got != addr:
        err = ctypes.get_errno()
        raise LLMException(LLMStatusCode.LLM_OUT_OF_MEMORY,
                           f"mapping {size} bytes at {addr:#x}: {os.strerror(err)}")


def _raise_fd_limit():
    """Every live cache holds a descriptor of its own: the soft limit on open
    files (often 1024) goes up to the hard one, once per process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):         # an unlimited hard limit: keep the soft one
            pass


# What a peer's memfd must carry before we map it (see SharedMemory).
SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


class SharedMemory:
    """Anonymous shared memory (memfd) mapped here; another process on the
    host can map the same pages from the fd. Its size is sealed: a mapping
    of a file that shrinks raises SIGBUS in every process touching it."""

    def __init__(self, size, name="kvcache-pool"):
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SIZE_SEALS | fcntl.F_SEAL_SEAL)
            self._map = mmap.mmap(self.fd, size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self._anchor = ctypes.c_char.from_buffer(self._map)
        self.addr = ctypes.addressof(self._anchor)

    def segment(self, addr, size):
        """Back [addr, addr + size) (page-aligned, inside this memory) by a
        memfd of its own, sealed at its size, and return that fd: a peer
        given it maps that range and nothing else of this memory. The range's
        contents are undefined afterwards (a new allocation's are anyway).
        None when the range is not whole pages."""
        page = mmap.PAGESIZE
        if addr % page or size % page or not self.addr <= addr < addr + size <= \
                self.addr + self.size:
            return None
        _raise_fd_limit()
        fd = os.memfd_create("kvcache-cache", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SIZE_SEALS | fcntl.F_SEAL_SEAL)
            _map_fixed(addr, size, fd, 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def unsegment(self, addr, size, fd):
        """Give [addr, addr + size) back to this memory's own memfd and close
        the segment's ``fd`` (a peer still mapping it keeps only those pages,
        which no longer back anything of ours)."""
        _map_fixed(addr, size, self.fd, addr - self.addr)
        os.close(fd)

    def close(self):
        if self._map is None:
            return
        del self._anchor
        self._map.close()
        self._map = None
        os.close(self.fd)


class _Tier:
    def __init__(self, base, total, blk, max_buf):
        self.base, self.total, self.blk, self.max_buf = base, total, blk, max_buf
        self.used = np.zeros(total // blk, dtype=bool)

    def alloc(self, size):
        count = -(-size // self.blk)
        free = (~self.used).astype(np.int32)
        window = np.convolve(free, np.ones(count, dtype=np.int32), mode="valid")
        hits = np.flatnonzero(window == count)
        if hits.size == 0:
            return None
        first = int(hits[0])
        self.used[first:first + count] = True
        return self.base + first * self.blk, count

    def free(self, addr, count):
        first = (addr - self.base) // self.blk
        self.used[first:first + count] = False


class BufferPool:
    """Allocator over one region at ``memory.addr`` of ``config.pool_size``
    bytes. ``alloc`` returns addresses; ``free`` takes them back."""

    def __init__(self, config=None, memory=None):
        self.config = config or BufPoolConfig()
        self.memory = memory if memory is not None else SharedMemory(self.config.pool_size)
        self.base = self.memory.addr
        self.size = self.config.pool_size
        self._lock = threading.Lock()
        self._tiers = []
        offset = 0
        for total, blk, max_buf in self.config.tiers:
            self._tiers.append(_Tier(self.base + offset, total, blk, max_buf))
            offset += total
        start = -(-offset // LARGE_ALIGN) * LARGE_ALIGN
        # Free extents of the large area: parallel sorted lists.
        self._free_starts = [self.base + start] if start < self.size else []
        self._free_sizes = [self.size - start] if start < self.size else []
        self._live = {}              # addr -> (tier index or -1, granules or bytes)

    def alloc(self, size):
        size = int(size)
        if size <= 0:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"allocation size must be positive, got {size}")
        with self._lock:
            for index, tier in enumerate(self._tiers):
                if size <= tier.max_buf:
                    got = tier.alloc(size)
                    if got is not None:
                        self._live[got[0]] = (index, got[1])
                        return got[0]
            addr = self._alloc_large(size)
            if addr is None:
                raise LLMException(LLMStatusCode.LLM_OUT_OF_MEMORY,
                                   f"buffer pool exhausted: {size} bytes requested, largest "
                                   f"free extent {max(self._free_sizes, default=0)} of "
                                   f"{self.size} bytes")
            return addr

    def _alloc_large(self, size):
        size = -(-size // LARGE_ALIGN) * LARGE_ALIGN
        for i, extent in enumerate(self._free_sizes):
            if extent >= size:
                addr = self._free_starts[i]
                if extent == size:
                    del self._free_starts[i], self._free_sizes[i]
                else:
                    self._free_starts[i] += size
                    self._free_sizes[i] -= size
                self._live[addr] = (-1, size)
                return addr
        return None

    def free(self, addr):
        with self._lock:
            entry = self._live.pop(int(addr), None)
            if entry is None:
                raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                   f"address {int(addr):#x} is not a live allocation of this "
                                   "pool (double free or foreign pointer)")
            kind, amount = entry
            if kind >= 0:
                self._tiers[kind].free(addr, amount)
                return
            i = bisect.bisect_left(self._free_starts, addr)
            self._free_starts.insert(i, addr)
            self._free_sizes.insert(i, amount)
            # Coalesce with the following, then the preceding extent.
            if i + 1 < len(self._free_starts) and addr + amount == self._free_starts[i + 1]:
                self._free_sizes[i] += self._free_sizes.pop(i + 1)
                self._free_starts.pop(i + 1)
            if i > 0 and self._free_starts[i - 1] + self._free_sizes[i - 1] == addr:
                self._free_sizes[i - 1] += self._free_sizes.pop(i)
                self._free_starts.pop(i)

    def allocation_size(self, addr):
        """Bytes reserved for a live allocation."""
        kind, amount = self._live[int(addr)]
        return amount * self._tiers[kind].blk if kind >= 0 else amount

    def stats(self):
        with self._lock:
            return dict(pool_size=self.size, live_allocations=len(self._live),
                        free_large_bytes=sum(self._free_sizes),
                        free_large_extents=len(self._free_sizes),
                        tiers=[dict(blk_size=t.blk, max_buf_size=t.max_buf,
                                    free_blocks=int((~t.used).sum()),
                                    total_blocks=int(t.used.size)) for t in self._tiers])

    def close(self):
        self.memory.close()
