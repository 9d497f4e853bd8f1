"""An in-memory transport for fast unit tests of transfer planning: both
engines live in this process, so a transfer is a memcpy, done after the
target engine's own piece check (RegionRegistry.pin_named), and recorded."""
import numpy as np

from kvcache.engine import TRANSPORTS
from kvcache.transports.base import Transport
from pyverbs_kv import sgio

_ENGINES = {}              # engine name -> its RegionRegistry


class MemoryTransport(Transport):
    """Records every transfer as (op, local, remote, lengths, regions)."""
    name = "memory"

    def __init__(self):
        self.transfers = []

    def bind(self, ctx):
        super().bind(ctx)
        _ENGINES[ctx.name] = ctx.regions

    def _move(self, op, peer, local, remote, lengths, regions):
        self.transfers.append((op, local.copy(), remote.copy(), lengths.copy(), regions.copy()))
        target = _ENGINES[peer.name]
        ids = target.pin_named(regions, remote, lengths)
        try:
            if op == "write":
                sgio.copy_pieces(remote, local, lengths)
            else:
                sgio.copy_pieces(local, remote, lengths)
        finally:
            target.unpin(ids)

    def write(self, peer, local, remote, lengths, regions, deadline):
        self._move("write", peer, local, remote, lengths, regions)

    def read(self, peer, local, remote, lengths, regions, deadline):
        self._move("read", peer, local, remote, lengths, regions)


def install(monkeypatch):
    """Make TransferEngine(transport="memory") use MemoryTransport."""
    monkeypatch.setitem(TRANSPORTS, "memory", lambda device_id: MemoryTransport())


def total_bytes(transport):
    return int(sum(int(np.sum(t[3])) for t in transport.transfers))
