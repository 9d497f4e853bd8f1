"""NVIDIA NIXL (the ``nixl-cu12`` wheel, installed without its dependencies:
its Python side needs only numpy, and CUDA torch is what a plain ``pip
install nixl`` pulls in) with its UCX backend on host memory (``DRAM``). Two
agents in two processes exchange their metadata through NIXL's own
``get_agent_metadata``/``add_remote_agent``; each batch is one transfer
request made from the bench's descriptor lists (``initialize_xfer``), posted
and polled until done."""
import logging
import time

import numpy as np

from kvcache.lifeline import worker_dies_with_parent

NAME = "nixl"
PIP = "pip install --no-deps nixl-cu12==1.5.1"
MODULE = "nixl_cu12._api"
# UCX's InfiniBand modules stay unloaded: they bring the wheel's own copy of
# libnl-route next to the system's (which rdma-core's providers load), and
# that copy's destructor segfaults at process exit (rtnl_tc_unregister, seen
# with nixl-cu12 1.5.1); host memory over tcp or cma never needs them.
# UCX_NET_DEVICES=lo: UCX would also stripe TCP over the host's other
# interfaces (eth0's address), and the bench talks over loopback only.
BASE = {"UCX_MODULES": "^ib*", "UCX_NET_DEVICES": "lo"}
# UCX picks its transports itself (on one host: cma, the kernel copying
# between the two processes' memory); UCX_TLS=tcp holds it to TCP sockets,
# the row to read next to the tcp rows.
VARIANTS = {"tcp": {**BASE, "UCX_TLS": "tcp"}, "ucx-auto": BASE}
# cma moves bytes between two processes' memory without a socket: the
# same-host class of our shm transport.
OURS = {"ucx-auto": "shm"}
TARGET, INITIATOR = "kvcache-bench-target", "kvcache-bench-initiator"
DEADLINE_S = 60
READY_TIMEOUT_S = 60


def _agent(name):
    from nixl_cu12._api import nixl_agent, nixl_agent_config
    # NIXL logs INFO to stdout, which would mix into the bench's table.
    logging.getLogger("nixl").setLevel(logging.WARNING)
    return nixl_agent(name, nixl_agent_config(backends=["UCX"]))


def _register(agent, buffer):
    region = np.array([[buffer.ctypes.data, buffer.nbytes, 0]], dtype=np.uint64)
    return agent.register_memory(region, "DRAM")


def target_main(conn, nbytes, fill):
    """The serving process: an agent with one registered buffer of
    ``nbytes`` holding ``fill``; sends (its metadata, buffer address), adds
    the initiator's metadata, says ready, then serves until the initiator
    closes the pipe."""
    worker_dies_with_parent()
    agent = _agent(TARGET)
    buffer = np.full(nbytes, fill, dtype=np.uint8)
    registered = _register(agent, buffer)
    conn.send((agent.get_agent_metadata(), buffer.ctypes.data))
    try:
        agent.add_remote_agent(conn.recv())
        conn.send("ready")
        conn.recv()
    except EOFError:
        pass
    agent.deregister_memory(registered)


class Initiator:
    def __init__(self, conn, nbytes, fill):
        metadata, self.remote_base = conn.recv()
        self.agent = _agent(INITIATOR)
        self.local = np.full(nbytes, fill, dtype=np.uint8)
        self.local_base = self.local.ctypes.data
        self.registered = _register(self.agent, self.local)
        self.remote = self.agent.add_remote_agent(metadata)
        conn.send(self.agent.get_agent_metadata())
        if not conn.poll(READY_TIMEOUT_S) or conn.recv() != "ready":
            raise SystemExit(f"kvcache bench: the nixl target did not add our metadata in "
                             f"{READY_TIMEOUT_S} s")

    def batch(self, op, local, remote, lengths):
        """A callable moving the whole batch once: a transfer request from the
        two descriptor lists (converted to NIXL's lists here, outside the
        timed call), posted, polled to DONE within DEADLINE_S, released."""
        zeros = np.zeros(len(lengths), dtype=np.uint64)
        local_descs = self.agent.get_xfer_descs(
            np.stack([local, lengths, zeros], axis=1).astype(np.uint64), "DRAM")
        remote_descs = self.agent.get_xfer_descs(
            np.stack([remote, lengths, zeros], axis=1).astype(np.uint64), "DRAM")
        operation = op.upper()
        agent, peer = self.agent, self.remote

        def run():
            handle = agent.initialize_xfer(operation, local_descs, remote_descs, peer)
            try:
                state = agent.transfer(handle)
                deadline = time.monotonic() + DEADLINE_S
                while state == "PROC" and time.monotonic() < deadline:
                    state = agent.check_xfer_state(handle)
                if state != "DONE":
                    raise SystemExit(f"kvcache bench: nixl {operation} of {len(lengths)} "
                                     f"blocks ended {state!r}"
                                     + (f" after {DEADLINE_S} s" if state == "PROC" else ""))
            finally:
                handle.release()
        return run

    def close(self):
        self.agent.deregister_memory(self.registered)
        self.agent.remove_remote_agent(self.remote)
        self.agent = None
