"""The prefill instance: ``POST /v1/completions`` with ``max_tokens`` 1 runs
the prompt through the model and answers its first token; with
``kv_transfer_params`` it pushes the prompt's KV cache, layer by layer as the
forward pass computes it, into the decode instance's block slots named there
(transfer_cache_async with a LayerClock fed from the model's per-layer hook).

    python -m kvcache.demo.prefill_server --cluster-id 1 [--transport shm] ...

``kv_transfer_params`` (what the proxy got from the decode's reservation):
``cluster_id`` (the decode's), ``kv_address`` ("ip:port" of its kvcache
listener), ``block_ids`` (its slots for the prompt's blocks, in token order),
``transfer_id``. The answer's ``kv_transfer`` says what moved and when."""
import argparse
import asyncio
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from aiohttp import web

from kvcache import (BlocksCacheKey, LinkState, LLMClusterInfo, LLMException, LLMRole,
                     LLMStatusCode, TransferWithCacheKeyConfig)
from kvcache.demo import instance, serving
from kvcache.demo.timeline import LayerClock
from kvcache.demo.tokenizer import ByteTokenizer

log = logging.getLogger(__name__)


class Prefill:
    """The instance's state; every model and link call runs on its one
    compute thread, one request at a time."""

    def __init__(self, args):
        self.args = args
        self.instance = instance.Instance(LLMRole.PROMPT, args, "")
        self.tokenizer = ByteTokenizer()
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="prefill")
        self.links = {}                          # decode cluster id -> its kv address

    def close(self):
        self.compute.shutdown(wait=True)
        self.instance.close()

    def _link(self, cluster_id, address):
        """Link to the decode's listener; "reused" when a live link to that
        address exists, else "new" (a failed link, or one to an address the
        cluster had before it restarted, is dropped first)."""
        dd = self.instance.dd
        state = dd.check_link_status(cluster_id)
        if state == LinkState.LINKED and self.links.get(cluster_id) == address:
            return "reused"
        info = LLMClusterInfo()
        info.remote_cluster_id = cluster_id
        if state != LinkState.IDLE:
            dd.unlink_clusters([info], force=True)
        self.links.pop(cluster_id, None)
        host, port = address.rsplit(":", 1)
        info.append_remote_ip_info(host, int(port))
        _, rets = dd.link_clusters([info], timeout=self.args.timeout_ms)
        if rets[0] != LLMStatusCode.LLM_SUCCESS:
            raise LLMException(rets[0], f"link to decode cluster {cluster_id} at {address} "
                               f"failed: {rets[0].name}")
        self.links[cluster_id] = address
        return "new"

    @staticmethod
    def _runs(src_ids, dst_ids):
        """Descriptors per tensor after merging: runs of blocks consecutive
        on both sides become one piece, as the engine's merge_runs does."""
        src, dst = np.asarray(src_ids, np.int64), np.asarray(dst_ids, np.int64)
        return 1 + int(np.count_nonzero((np.diff(src) != 1) | (np.diff(dst) != 1)))

    def run(self, prompt_ids, params):
        """Prefill ``prompt_ids`` (blocking; the compute thread): returns
        (first token, kv_transfer dict or None)."""
        inst = self.instance
        model = inst.model
        table = inst.blocks.allocate(model.blocks_needed(len(prompt_ids)))
        try:
            if params is None:
                return model.prefill(prompt_ids, inst.kv, table), None
            return self._push(prompt_ids, params, table)
        finally:
            inst.blocks.free(table)

    def _push(self, prompt_ids, params, table):
        inst = self.instance
        model, cm = inst.model, inst.dd.cache_manager
        layers = model.config.num_layers
        cluster_id, address = params["cluster_id"], params["kv_address"]
        dst = list(params["block_ids"])[:len(table)]
        if len(dst) != len(table):
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"{len(dst)} destination blocks for a prompt of {len(table)}")
        link = self._link(cluster_id, address)
        clock = LayerClock(layers)
        config = TransferWithCacheKeyConfig(BlocksCacheKey(cluster_id), range(layers),
                                            range(layers))
        task = cm.transfer_cache_async(inst.cache, clock, [config], src_block_indices=table,
                                       dst_block_indices=dst,
                                       transfer_id=params["transfer_id"])
        start = time.monotonic()
        try:
            first = model.prefill(prompt_ids, inst.kv, table, on_layer=clock.layer_done)
        except BaseException:
            clock.abort()
            task.synchronize(self.args.timeout_ms)      # the blocks are read until it ends
            raise
        computed = time.monotonic()
        status = task.synchronize(self.args.timeout_ms)
        done = time.monotonic()
        if status != LLMStatusCode.LLM_SUCCESS:
            raise LLMException(status, f"pushing the KV cache to decode cluster {cluster_id} "
                               f"at {address} failed: {status.name}")
        clock.finish(done)
        pieces = 2 * layers * len(table)
        nbytes = 2 * layers * len(table) * model.config.block_bytes
        stats = {"transport": inst.dd.transport, "link": link, "layers": layers,
                 "blocks": len(table), "block_bytes": model.config.block_bytes,
                 "bytes": nbytes, "descriptors": pieces,
                 "descriptors_merged": 2 * layers * self._runs(table, dst),
                 "src_block_ids": list(table), "dst_block_ids": dst,
                 **clock.summary(start, computed, done, nbytes)}
        return first, stats


async def complete(request):
    prefill = request.app["prefill"]
    body = await serving.read_json(request)
    prompt, max_tokens, stream = serving.completion_request(body)
    if max_tokens != 1 or stream:
        raise serving.bad_request("a prefill instance answers max_tokens=1, stream=false only")
    params = body.get("kv_transfer_params")
    if params is not None:
        if not isinstance(params, dict) or not {"cluster_id", "kv_address", "block_ids",
                                                "transfer_id"} <= params.keys():
            raise serving.bad_request("kv_transfer_params needs cluster_id, kv_address, "
                                      "block_ids and transfer_id")
    prompt_ids = prefill.tokenizer.encode(prompt)
    loop = asyncio.get_running_loop()
    try:
        first, stats = await loop.run_in_executor(prefill.compute, prefill.run, prompt_ids,
                                                  params)
    except LLMException as exc:
        status = 400 if exc.status_code == LLMStatusCode.LLM_PARAM_INVALID else 503
        return serving.json_error(status, f"prefill cluster {prefill.args.cluster_id}: {exc}",
                                  "prefill_error", code=exc.status_code.name)
    return web.json_response(serving.completion(
        prefill.tokenizer.decode([first]), [first], "length", len(prompt_ids),
        kv_transfer=stats))


async def health(request):
    prefill = request.app["prefill"]
    return web.json_response({"role": "prefill", "cluster_id": prefill.args.cluster_id,
                              "free_blocks": prefill.instance.blocks.free_count})


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m kvcache.demo.prefill_server", description=__doc__.split("\n\n")[0],
        epilog="Prints 'READY {json}' on stdout once it listens; SIGTERM or Ctrl-C stops it.")
    instance.add_server_arguments(parser, "prefill")
    return parser


async def amain(args):
    prefill = Prefill(args)
    try:
        app = web.Application()
        app["prefill"] = prefill
        app.router.add_post("/v1/completions", complete)
        app.router.add_get("/health", health)
        await serving.serve(app, args.host, args.port,
                            {"role": "prefill", "cluster_id": args.cluster_id,
                             "transport": prefill.instance.dd.transport})
    finally:
        prefill.close()


def main(argv=None):
    return instance.run_server("prefill", build_parser(), amain, argv)


if __name__ == "__main__":
    sys.exit(main())
