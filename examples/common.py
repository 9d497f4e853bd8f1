"""Shared scaffolding of the examples: start an LLMDataDist, link it, and
run a prompt process beside the decoder (every example is two or more real
processes on 127.0.0.1)."""
import multiprocessing as mp

import numpy as np

from kvcache import LLMClusterInfo, LLMConfig, LLMDataDist, LLMStatusCode

TIMEOUT_S = 60


def start(role, cluster_id, listen="", **config):
    dd = LLMDataDist(role, cluster_id)
    cfg = LLMConfig()
    cfg.listen_ip_info = listen
    cfg.mem_pool_cfg = '{"memory_size": 268435456}'   # allocate_cache takes from this pool
    for key, value in config.items():
        setattr(cfg, key, value)
    dd.init(cfg.generate_options())
    return dd


def link(dd, remote_cluster_id, address):
    info = LLMClusterInfo()
    info.remote_cluster_id = remote_cluster_id
    host, port = address.rsplit(":", 1)
    info.append_remote_ip_info(host, int(port))
    ret, rets = dd.link_clusters([info], timeout=3000)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise SystemExit(f"link to cluster {remote_cluster_id} failed: {rets[0].name}")


def unlink(dd, remote_cluster_id):
    info = LLMClusterInfo()
    info.remote_cluster_id = remote_cluster_id
    dd.unlink_clusters([info])


def fill(cache, seed):
    """Deterministic contents, so the other side can check what it got."""
    for i, tensor in enumerate(cache.tensors()):
        tensor.view(np.uint16)[...] = expected(seed, i, tensor.shape, tensor.dtype).view(
            np.uint16)


def expected(seed, index, shape, dtype):
    """A cheap pseudo-random bit pattern per (seed, tensor)."""
    count = int(np.prod(shape)) * np.dtype(dtype).itemsize // 2
    words = (np.arange(count, dtype=np.uint32) * np.uint32(2654435761)
             + np.uint32(seed * 7919 + index * 104729)) >> np.uint32(16)
    return words.astype(np.uint16).view(dtype).reshape(shape)


def spawn(target, *args):
    """Start ``target(address_queue, done_event, *args)`` in a new process;
    returns (process, the address it listens on, the event that ends it)."""
    ctx = mp.get_context("spawn")
    addresses, done = ctx.Queue(), ctx.Event()
    process = ctx.Process(target=target, args=(addresses, done) + args)
    process.start()
    return process, addresses.get(timeout=TIMEOUT_S), done


def finish(process, done):
    done.set()
    process.join(TIMEOUT_S)
    if process.exitcode != 0:
        raise SystemExit(f"{process.name} exited with {process.exitcode}")
