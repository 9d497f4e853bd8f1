"""One server instance's model and KV memory: the model, an LLMDataDist and
its paged blocks cache in kvcache's buffer pool, a block allocator over it,
and the options of both servers that set them up."""
import asyncio
import json
import logging
import sys

import torch

from kvcache import (BlocksCacheKey, CacheDesc, DataType, LLMConfig, LLMDataDist, LLMException,
                     LLMRole)
from kvcache.lifeline import die_with_parent
from kvcache.demo.model import ModelConfig, TinyLlama
from kvcache.demo.paging import BlockAllocator, layer_views

TRANSPORTS = ("auto", "tcp", "shm", "rdma")
POOL_SLACK = 1 << 20                 # the pool's own alignment, beyond the cache


def model_config(text):
    """ModelConfig from a JSON object of its fields (argparse type)."""
    try:
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
        return ModelConfig(**fields)
    except (ValueError, TypeError, LLMException) as exc:
        raise ValueError(f"bad model config {text!r}: {exc}") from None


def positive(text):
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise ValueError(f"{value} is not positive")
    return value


def add_server_arguments(parser, role):
    parser.add_argument("--host", default="127.0.0.1",
                        help="HTTP address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0,
                        help="HTTP port (default 0: a free one, announced on stdout)")
    parser.add_argument("--kv-host", default="127.0.0.1",
                        help="address of the kvcache link listener (decode) (default 127.0.0.1)")
    parser.add_argument("--cluster-id", type=int, required=True,
                        help=f"kvcache cluster id of this {role} instance (unique per instance)")
    parser.add_argument("--transport", choices=TRANSPORTS, default="shm",
                        help="kvcache transport; both sides must use the same (default shm)")
    parser.add_argument("--model-config", type=model_config, default=ModelConfig(),
                        metavar="JSON", help="ModelConfig fields as a JSON object "
                        "(default {}: 4 layers, hidden 128)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    parser.add_argument("--num-blocks", type=positive, default=256,
                        help="KV blocks of this instance's blocks cache (default 256)")
    parser.add_argument("--timeout-ms", type=positive, default=10000,
                        help="deadline of each transfer, layer wait and link (ms, default 10000)")
    parser.add_argument("--threads", type=positive, default=1,
                        help="torch threads (default 1; processes compared bit for bit must "
                        "use the same)")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="die with this process (set by kvcache.demo.run)")


def setup_process(args):
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    torch.set_num_threads(args.threads)


def run_server(role, parser, amain, argv):
    """A server process's main: parse ``argv`` with ``parser``, set up the
    process, run ``amain(args)`` until it stops; 1 (with the error on
    stderr) when it raised an LLMException, else 0."""
    args = parser.parse_args(argv)
    setup_process(args)
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {role} %(message)s")
    try:
        asyncio.run(amain(args))
    except LLMException as exc:
        print(f"{role} server: {exc}", file=sys.stderr)
        return 1
    return 0


class Instance:
    """The model, an LLMDataDist of ``role`` and its blocks cache of
    ``args.num_blocks`` blocks (K of layer L at tensor 2L, V at 2L+1;
    offered to linked peers under BlocksCacheKey(cluster id)), with a
    BlockAllocator over it."""

    def __init__(self, role, args, listen):
        self.args = args
        self.model = TinyLlama(args.model_config, seed=args.seed)
        c = self.model.config
        desc = CacheDesc(2 * c.num_layers, DataType.DT_FLOAT, [args.num_blocks, *c.block_shape])
        self.dd = LLMDataDist(role, args.cluster_id)
        cfg = LLMConfig()
        cfg.listen_ip_info = listen
        cfg.transport = args.transport
        cfg.sync_kv_timeout = args.timeout_ms
        cfg.link_timeout = args.timeout_ms
        cfg.buf_pool_cfg = json.dumps(
            {"buf_pool_size": desc.num_tensors * desc.tensor_bytes + POOL_SLACK})
        self.dd.init(cfg.generate_options())
        try:
            self.cache = self.dd.cache_manager.allocate_blocks_cache(
                desc, BlocksCacheKey(args.cluster_id))
            self.kv = layer_views(self.cache, c.num_layers)
        except BaseException:
            self.dd.finalize()
            raise
        # A decode hands out its highest free ids, so its slots differ from
        # the prefill's lowest ones as they would between real instances.
        self.blocks = BlockAllocator(args.num_blocks, highest=role == LLMRole.DECODER)

    def close(self):
        self.dd.finalize()
