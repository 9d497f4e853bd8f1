"""Shared scaffolding of the examples: start an LLMDataDist, link it, and
run a prompt process beside the decoder (every example is two or more real
processes on 127.0.0.1). A child that fails makes the parent fail at once
with the child's error; children die with their parent."""
import argparse
import multiprocessing as mp
import os
import sys
import time
from queue import Empty

import numpy as np

from kvcache import LLMClusterInfo, LLMConfig, LLMDataDist, LLMStatusCode
from kvcache.lifeline import die_with_parent

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


def parse_args(doc, add=None):
    """The example's command line: ``--help`` prints its docstring; ``add``
    adds its options to the parser."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if add is not None:
        add(parser)
    return parser.parse_args()


def positive(text):
    """argparse type: an integer above 0."""
    value = int(text) if text.strip().isdigit() else 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _child_main(parent_pid, errors, target, args):
    die_with_parent(parent_pid)
    try:
        target(*args)
    except BaseException as exc:       # reported to the parent, which fails with it
        errors.put(f"{type(exc).__name__}: {exc}")
        sys.exit(1)


def start_process(target, *args, name=None):
    """Start ``target(*args)`` in a new (spawned) process that dies with this
    one; an exception in it is reported to whoever waits on it with
    ``receive``."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    process = ctx.Process(target=_child_main, args=(os.getpid(), errors, target, args),
                          name=name or target.__name__)
    process.errors = errors
    process.start()
    return process


def receive(queue, *processes, timeout=TIMEOUT_S):
    """The next item of ``queue``, which ``processes`` feed; the moment one of
    them has failed, SystemExit with its error instead of waiting out the
    deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return queue.get(timeout=0.1)
        except Empty:
            pass
        for process in processes:
            if process.exitcode not in (None, 0):
                raise SystemExit(f"{process.name} process failed: {error_of(process)}")
        if time.monotonic() > deadline:
            raise SystemExit(f"no word from {', '.join(p.name for p in processes)} "
                             f"within {timeout} s")


def error_of(process):
    """What a failed ``start_process`` child reported (its exception), else its exit code."""
    try:
        return process.errors.get(timeout=1)
    except Empty:
        return f"exited with {process.exitcode}"


def spawn(target, *args):
    """Start ``target(address_queue, done_event, *args)`` in a new process;
    returns (process, the address it listens on, the event that ends it)."""
    ctx = mp.get_context("spawn")
    addresses, done = ctx.Queue(), ctx.Event()
    process = start_process(target, addresses, done, *args)
    return process, receive(addresses, process), done


def finish(process, done):
    done.set()
    process.join(TIMEOUT_S)
    if process.exitcode is None:
        process.kill()
        raise SystemExit(f"{process.name} process did not end within {TIMEOUT_S} s")
    if process.exitcode != 0:
        raise SystemExit(f"{process.name} process failed: {error_of(process)}")
