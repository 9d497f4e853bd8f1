"""Shared by the rank-table examples (the flow of llm_datadist's link /
query_register_mem_status): the rank table both processes pass to link, the
wait for the comm's status, and a prompt process started beside the decoder.
Two real processes on 127.0.0.1; each member listens at the device_ip and
device_port its rank table entry names."""
import json
import multiprocessing as mp
import socket
import time

from common import start_process
from kvcache import RegisterMemStatus

CLUSTER_RANK_INFO = {1: 0, 2: 1}     # prompt cluster 1 is rank 0, decoder cluster 2 rank 1
LINK_TIMEOUT_MS = 30_000             # both interpreters must start and call link within it
TIMEOUT_S = 60


def free_port(ip):
    with socket.socket() as sock:
        sock.bind((ip, 0))
        return sock.getsockname()[1]


def rank_table(ip="127.0.0.1"):
    """An HCCL-style rank table (version 1.2): one server, one device per
    rank, each at a free port of ``ip``."""
    devices = [{"device_id": str(rank), "device_ip": ip, "device_port": free_port(ip),
                "rank_id": str(rank)} for rank in sorted(CLUSTER_RANK_INFO.values())]
    return json.dumps({"version": "1.2", "server_count": "1", "status": "completed",
                       "server_list": [{"server_id": "1", "host_ip": ip, "device": devices}]})


def link(dd, table):
    """link, then poll the status until OK; returns the comm id."""
    comm_id = dd.link("link", CLUSTER_RANK_INFO, table)
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        status = dd.query_register_mem_status(comm_id)
        if status == RegisterMemStatus.OK:
            return comm_id
        if status == RegisterMemStatus.FAILED or time.monotonic() > deadline:
            raise SystemExit(f"cluster {dd.cluster_id}: rank-table link {status.name}")
        time.sleep(0.05)


def spawn(target, *args):
    """Start ``target(ready, done, *args)`` in a new process; returns
    (process, the queue it reports on once ready, the event that ends it)."""
    ctx = mp.get_context("spawn")
    ready, done = ctx.Queue(), ctx.Event()
    return start_process(target, ready, done, *args), ready, done
