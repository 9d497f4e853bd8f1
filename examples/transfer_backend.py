"""The flow of llm_datadist's transfer-backend sample, on CPU tensors: both
ends listen and each links to the other (client and server at once, whatever
the role); the prompt pulls block 2 of the decoder's blocks cache while the
decoder pushes blocks 0 and 1 into the prompt's; a torch.distributed (gloo)
barrier marks each step, as the sample's does. ``transfer_backend = "hixl"``
is accepted and logged as having no effect here.

    python examples/transfer_backend.py [--transport auto|tcp|shm|rdma]
"""
import datetime
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

from common import error_of, parse_args, start_process
from kvcache import (BlocksCacheKey, CacheDesc, DataType, LLMClusterInfo, LLMConfig,
                     LLMDataDist, LLMRole, LLMStatusCode, Placement)

PROMPT, DECODER = 0, 1
NUM_TENSORS, BLOCKS, BLOCK_FLOATS = 2, 3, 1024
TIMEOUT = datetime.timedelta(seconds=60)


def cluster(remote_id, address=None):
    info = LLMClusterInfo()
    info.remote_cluster_id = remote_id
    if address is not None:
        host, port = address.rsplit(":", 1)
        info.append_remote_ip_info(host, int(port))
    return info


def run(rank, store_port, transport):
    # The barriers only ever use loopback, never this host's other interfaces.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{store_port}", rank=rank,
                            world_size=2, timeout=TIMEOUT)
    role = LLMRole.PROMPT if rank == PROMPT else LLMRole.DECODER
    peer = DECODER if rank == PROMPT else PROMPT
    datadist = LLMDataDist(role, rank)
    config = LLMConfig()
    config.transfer_backend = "hixl"
    config.local_comm_res = ""
    config.listen_ip_info = "127.0.0.1:0"
    config.transport = transport
    datadist.init(config.generate_options())
    addresses = [None, None]
    dist.all_gather_object(addresses, datadist.listen_address)

    manager = datadist.cache_manager
    desc = CacheDesc(NUM_TENSORS, [BLOCKS, BLOCK_FLOATS], DataType.DT_FLOAT, Placement.HOST)
    fill = 1.0 if rank == PROMPT else 0.0
    tensors = [torch.full((BLOCKS, BLOCK_FLOATS), fill) for _ in range(NUM_TENSORS)]
    cache = manager.register_blocks_cache(desc, [t.data_ptr() for t in tensors],
                                          BlocksCacheKey(rank, 0))
    dist.barrier()                                       # both caches registered

    ret, _ = datadist.link_clusters([cluster(peer, addresses[peer])], 5000)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise SystemExit(f"cluster {rank}: link to {peer} failed: {ret.name}")
    if rank == PROMPT:
        manager.pull_blocks(BlocksCacheKey(DECODER, 0), cache, src_blocks=[2], dst_blocks=[2])
    else:
        manager.push_blocks(BlocksCacheKey(PROMPT, 0), cache, src_blocks=[0, 1],
                            dst_blocks=[0, 1])
    dist.barrier()                                       # the push and the pull are done

    if rank == PROMPT:
        for index, tensor in enumerate(tensors):
            if not torch.equal(tensor, torch.zeros_like(tensor)):
                raise SystemExit(f"prompt tensor {index} is not the decoder's zeros: {tensor}")
        print(f"OK: {transport}: block 2 pulled and blocks 0, 1 pushed over links both ways")

    ret, _ = datadist.unlink_clusters([cluster(peer)], 5000)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise SystemExit(f"cluster {rank}: unlink failed: {ret.name}")
    dist.barrier()                                       # both unlinked
    manager.unregister_cache(cache.cache_id)
    datadist.finalize()
    dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main():
    args = parse_args(__doc__, lambda parser: parser.add_argument(
        "--transport", default="auto", choices=("auto", "tcp", "shm", "rdma")))
    store_port = free_port()
    processes = [start_process(run, rank, store_port, args.transport,
                               name=("prompt", "decoder")[rank]) for rank in (PROMPT, DECODER)]
    # The first failure ends the run (its peer would wait at a barrier until the timeout).
    deadline = time.monotonic() + TIMEOUT.total_seconds() * 2
    while any(p.exitcode is None for p in processes) and time.monotonic() < deadline:
        failed = [p for p in processes if p.exitcode not in (None, 0)]
        if failed:
            break
        time.sleep(0.1)
    failed = [f"{p.name} process failed: {error_of(p)}" for p in processes
              if p.exitcode not in (None, 0)]
    late = [f"{p.name} process did not finish" for p in processes if p.exitcode is None]
    for process in processes:
        process.kill()
        process.join()
    if failed or late:
        sys.exit("; ".join(failed + late))


if __name__ == "__main__":
    main()
