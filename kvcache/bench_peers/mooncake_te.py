"""Mooncake's transfer engine (``mooncake.engine.TransferEngine`` from the
``mooncake-transfer-engine-non-cuda`` wheel) over its ``tcp`` protocol on
127.0.0.1, segments found by P2P handshake: the target registers one buffer,
the initiator moves each batch with ``batch_transfer_sync_read/write`` of
the bench's descriptor lists."""
import numpy as np

from kvcache.lifeline import worker_dies_with_parent

NAME = "mooncake"
PIP = "pip install mooncake-transfer-engine-non-cuda==0.3.13.post1"
MODULE = "mooncake.engine"
# Its INFO/WARNING lines (one per segment, handshake and topology probe)
# would interleave with the bench's output; errors still show.
VARIANTS = {"tcp": {"MC_LOG_LEVEL": "ERROR"}}
OURS = {}


def _engine():
    from mooncake.engine import TransferEngine
    engine = TransferEngine()
    rc = engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")
    if rc != 0:
        raise SystemExit(f"kvcache bench: mooncake TransferEngine.initialize returned {rc}")
    return engine


def _register(engine, buffer):
    rc = engine.register_memory(buffer.ctypes.data, buffer.nbytes)
    if rc != 0:
        raise SystemExit(f"kvcache bench: mooncake register_memory of {buffer.nbytes} bytes "
                         f"returned {rc}")


def target_main(conn, nbytes, fill):
    """The serving process: one registered buffer of ``nbytes`` holding
    ``fill``; sends (segment name, buffer address), then serves until the
    initiator closes the pipe."""
    worker_dies_with_parent()
    engine = _engine()
    buffer = np.full(nbytes, fill, dtype=np.uint8)
    _register(engine, buffer)
    conn.send((f"127.0.0.1:{engine.get_rpc_port()}", buffer.ctypes.data))
    try:
        conn.recv()
    except EOFError:
        pass
    engine.unregister_memory(buffer.ctypes.data)


class Initiator:
    def __init__(self, conn, nbytes, fill):
        self.segment, self.remote_base = conn.recv()
        self.engine = _engine()
        self.local = np.full(nbytes, fill, dtype=np.uint8)
        self.local_base = self.local.ctypes.data
        _register(self.engine, self.local)

    def batch(self, op, local, remote, lengths):
        """A callable moving the whole batch once. The lists are built here,
        outside the timed call: Mooncake takes Python lists of ints."""
        call = {"read": self.engine.batch_transfer_sync_read,
                "write": self.engine.batch_transfer_sync_write}[op]
        args = (self.segment, local.tolist(), remote.tolist(), lengths.tolist())

        def run():
            rc = call(*args)
            if rc != 0:
                raise SystemExit(f"kvcache bench: mooncake batch_transfer_sync_{op} of "
                                 f"{len(args[1])} blocks returned {rc}")
        return run

    def close(self):
        self.engine.unregister_memory(self.local_base)
        self.engine = None
