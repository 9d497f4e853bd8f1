"""The demo model: a faithful Llama (same logits as Hugging Face's
LlamaForCausalLM on the same weights), paged K/V equal to dense attention,
decode continuing exactly from blocks moved to other ids, the per-layer
hook, the tokenizer and the seeded weights."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvcache import (BlocksCacheKey, CacheDesc, DataType, LLMClusterInfo, LLMConfig,
                     LLMDataDist, LLMException, LLMRole, LLMStatusCode)
from kvcache.demo.model import ModelConfig, TinyLlama, init_weights
from kvcache.demo.paging import BlockAllocator, layer_views
from kvcache.demo.tokenizer import BOS_ID, EOS_ID, ByteTokenizer

PROMPT = "The KV cache of a prompt moves between processes; decode continues from it."
NEW_TOKENS = 12
# fp32 logits are O(10) here; one ulp at 16 is 2e-6. Reassociation of the same
# math (another matmul blocking, HF's fused rotary) stays within ~10 ulp per
# layer; a real defect (rotary pairing, the GQA head map, a norm) moves logits
# by O(0.1..1). 1e-4 separates the two by three orders of magnitude either way.
ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return TinyLlama(seed=1234)


@pytest.fixture(scope="module")
def prompt():
    return ByteTokenizer().encode(PROMPT)


def hf_model(model):
    c = model.config
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                         intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                         num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
                         rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
                         max_position_embeddings=1024, tie_word_embeddings=False,
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    config._attn_implementation = "eager"
    hf = LlamaForCausalLM(config).to(torch.float32).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf


def scattered_table(model, tokens, first=3):
    """A block table of non-adjacent, out-of-order ids."""
    n = model.blocks_needed(tokens)
    return [first + 2 * (n - 1 - i) for i in range(n)]


def test_matches_hugging_face_llama_over_prompt_and_decode(model, prompt):
    hf = hf_model(model)
    kv = model.new_kv(64)
    table = scattered_table(model, len(prompt) + NEW_TOKENS)
    logits = [model.forward(prompt, 0, kv, table)]
    tokens = [int(logits[0][-1].argmax())]
    for step in range(NEW_TOKENS - 1):
        logits.append(model.forward(tokens[-1:], len(prompt) + step, kv, table))
        tokens.append(int(logits[-1][-1].argmax()))
    ours = torch.cat(logits)                      # positions 0..len(prompt)+NEW_TOKENS-2

    with torch.no_grad():
        theirs = hf(torch.tensor([prompt + tokens[:-1]])).logits[0]
        generated = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                                do_sample=False, eos_token_id=None)[0, len(prompt):]
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max() < ATOL
    assert ours.abs().max() > 1.0                 # not a trivially flat model
    # HF decoding with its own (dense) cache picks the same tokens as ours.
    assert generated.tolist() == tokens
    assert len(set(tokens)) > 1


def test_paged_prefill_and_decode_equal_dense(model, prompt):
    kv = model.new_kv(32)
    table = scattered_table(model, len(prompt) + NEW_TOKENS, first=1)
    tokens = model.generate(prompt, NEW_TOKENS, kv, table)
    assert len(tokens) == NEW_TOKENS
    dense = model.forward_dense(prompt + tokens[:-1])
    # Greedy on the dense logits picks the same tokens...
    assert dense[len(prompt) - 1:].argmax(-1).tolist() == tokens
    # ...and the paged prompt logits are the dense ones (other shapes, so
    # rounding may differ in the last bits).
    assert (model.forward(prompt, 0, model.new_kv(32), table) - dense[:len(prompt)]).abs().max() \
        < ATOL


def test_decode_from_relocated_blocks_equals_decode_in_place(model, prompt):
    """Prefill writes blocks A; a copy goes to blocks B of another cache
    (what a transfer does); decode from B matches decode from A bit for bit."""
    total = len(prompt) + NEW_TOKENS
    here = model.new_kv(40)
    table_a = scattered_table(model, total, first=0)
    first = model.prefill(prompt, here, table_a)

    there = model.new_kv(40)
    for k, v in there:                            # rows decode must never read
        k.fill_(float("nan"))
        v.fill_(float("nan"))
    table_b = [39 - 3 * i for i in range(len(table_a))]
    assert not set(table_a) & set(table_b)
    prompt_blocks = model.blocks_needed(len(prompt))
    for (ka, va), (kb, vb) in zip(here, there):
        kb[table_b[:prompt_blocks]] = ka[table_a[:prompt_blocks]]
        vb[table_b[:prompt_blocks]] = va[table_a[:prompt_blocks]]

    in_place = model.forward([first], len(prompt), here, table_a)
    moved = model.forward([first], len(prompt), there, table_b)
    assert torch.equal(in_place, moved)
    assert model.decode(first, len(prompt), here, table_a, NEW_TOKENS) == \
        model.decode(first, len(prompt), there, table_b, NEW_TOKENS)
    # The relocated cache is not read outside its table: NaNs elsewhere never leaked in.
    assert not torch.isnan(moved).any()

    # A wrong table (blocks in the wrong order) changes the continuation's logits.
    swapped = table_b[:]
    swapped[0], swapped[1] = swapped[1], swapped[0]
    assert not torch.allclose(model.forward([first], len(prompt), there, swapped), moved)


def test_layer_hook_runs_after_each_layer_is_written(model, prompt):
    kv = model.new_kv(16)
    table = scattered_table(model, len(prompt), first=2)
    seen = []

    def on_layer(layer, blocks):
        k, v = kv[layer]
        later_untouched = all(not kv[j][0][table].any() for j in range(layer + 1, len(kv)))
        seen.append((layer, list(blocks), k[table].clone(), v[table].clone(), later_untouched))

    model.prefill(prompt, kv, table, on_layer)
    assert [s[0] for s in seen] == list(range(model.config.num_layers))
    for layer, blocks, k, v, later_untouched in seen:
        assert blocks == table
        # At the call, the layer's blocks already hold their final K/V and
        # the layers after it have not run.
        assert torch.equal(k, kv[layer][0][table]) and torch.equal(v, kv[layer][1][table])
        assert k.any() and later_untouched

    # A decode step reports only the block its one token went into.
    seen.clear()
    big = scattered_table(model, len(prompt) + 1, first=2)
    model.forward([65], len(prompt), kv, big, on_layer)
    assert {tuple(s[1]) for s in seen} == {(big[len(prompt) // model.config.block_tokens],)}


def test_blocks_cache_from_the_buffer_pool(model, prompt):
    """Views of a kvcache blocks cache (2 tensors per layer, llm_datadist's
    layout) run the model exactly as plain tensors do."""
    c = model.config
    dd = LLMDataDist(LLMRole.MIX, 7)
    cfg = LLMConfig()
    cfg.buf_pool_cfg = '{"buf_pool_size": 67108864}'
    dd.init(cfg.generate_options())
    try:
        cache = dd.cache_manager.allocate_blocks_cache(
            CacheDesc(2 * c.num_layers, DataType.DT_FLOAT, [24, *c.block_shape]))
        kv = layer_views(cache, c.num_layers)
        table = BlockAllocator(24).allocate(model.blocks_needed(len(prompt) + NEW_TOKENS))
        assert model.generate(prompt, NEW_TOKENS, kv, table) == \
            model.generate(prompt, NEW_TOKENS, model.new_kv(24), table)
        # The model wrote into the registered memory itself.
        assert cache.numpy(2 * (c.num_layers - 1) + 1)[table[0]].any()
        with pytest.raises(LLMException) as err:
            layer_views(cache, c.num_layers + 1)
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
        dd.cache_manager.deallocate_cache(cache)
    finally:
        dd.finalize()


def _datadist(role, cluster_id, transport, listen):
    dd = LLMDataDist(role, cluster_id)
    cfg = LLMConfig()
    cfg.transport = transport
    cfg.buf_pool_cfg = '{"buf_pool_size": 67108864}'
    if listen:
        cfg.listen_ip_info = "127.0.0.1:0"
    dd.init(cfg.generate_options())
    return dd


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_each_layer_pulled_from_the_hook_into_other_blocks(model, prompt, transport):
    """The layer-wise flow over a real link (two engines in this process): as
    each layer's K/V land in the prompt side's blocks, one pull_blocks call
    moves that layer into the decoder's own, different block ids; the
    decoder then continues exactly as the prompt side would."""
    c = model.config
    prompt_dd = _datadist(LLMRole.PROMPT, 1, transport, True)
    decoder_dd = _datadist(LLMRole.DECODER, 2, transport, False)
    try:
        desc = CacheDesc(2 * c.num_layers, DataType.DT_FLOAT, [32, *c.block_shape])
        prompt_cache = prompt_dd.cache_manager.allocate_blocks_cache(desc, BlocksCacheKey(1))
        decoder_cache = decoder_dd.cache_manager.allocate_blocks_cache(desc)
        info = LLMClusterInfo()
        info.remote_cluster_id = 1
        host, port = prompt_dd.listen_address.rsplit(":", 1)
        info.append_remote_ip_info(host, int(port))
        assert decoder_dd.link_clusters([info], timeout=10_000)[0] == LLMStatusCode.LLM_SUCCESS

        needed = model.blocks_needed(len(prompt) + NEW_TOKENS)
        prompt_table = BlockAllocator(32).allocate(needed)
        decoder_table = [31 - 2 * i for i in range(needed)]
        pulled = []

        def send_layer(layer, ids):
            decoder_dd.cache_manager.pull_blocks(
                BlocksCacheKey(1), decoder_cache, src_blocks=ids,
                dst_blocks=[decoder_table[prompt_table.index(i)] for i in ids],
                src_layer_range=range(layer, layer + 1), dst_layer_range=range(layer, layer + 1))
            pulled.append(layer)

        here = layer_views(prompt_cache, c.num_layers)
        there = layer_views(decoder_cache, c.num_layers)
        first = model.prefill(prompt, here, prompt_table, send_layer)
        assert pulled == list(range(c.num_layers))
        assert torch.equal(model.forward([first], len(prompt), here, prompt_table),
                           model.forward([first], len(prompt), there, decoder_table))
        assert model.decode(first, len(prompt), here, prompt_table, NEW_TOKENS) == \
            model.decode(first, len(prompt), there, decoder_table, NEW_TOKENS)
        decoder_dd.unlink_clusters([info])
    finally:
        decoder_dd.finalize()
        prompt_dd.finalize()


def test_weights_are_deterministic_from_the_seed():
    a, b, other = init_weights(ModelConfig(), 7), init_weights(ModelConfig(), 7), \
        init_weights(ModelConfig(), 8)
    assert a.keys() == b.keys() == other.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not any(torch.equal(a[name], other[name]) for name in a)
    assert TinyLlama(seed=7).generate([BOS_ID, 72, 105], 4, *_kv_and_table()) == \
        TinyLlama(seed=7).generate([BOS_ID, 72, 105], 4, *_kv_and_table())


def _kv_and_table():
    return TinyLlama(seed=0).new_kv(2), [1]


def test_tokenizer_round_trip():
    tok = ByteTokenizer()
    for text in ["", "hello", "KV → décodé, 日本語, 🙂", "a\x00b\n"]:
        ids = tok.encode(text)
        assert ids[0] == BOS_ID and all(0 <= i < 256 for i in ids[1:])
        assert tok.decode(ids) == text
        assert tok.decode(tok.encode(text, bos=False) + [EOS_ID]) == text
    assert tok.decode([0xE6, 0x97]) == "\ufffd"   # a cut-off character, shown as U+FFFD
    with pytest.raises(LLMException) as err:
        tok.decode([5, 258])
    assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    with pytest.raises(LLMException):
        tok.encode(b"bytes")


def test_block_allocator_and_bad_arguments(model, prompt):
    alloc = BlockAllocator(4)
    ids = alloc.allocate(3)
    assert ids == [0, 1, 2] and alloc.free_count == 1
    with pytest.raises(LLMException) as err:
        alloc.allocate(2)
    assert err.value.status_code == LLMStatusCode.LLM_OUT_OF_MEMORY
    assert alloc.free_count == 1                  # a refused allocation takes nothing
    alloc.free([1])
    with pytest.raises(LLMException) as err:
        alloc.free([1])
    assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    assert alloc.allocate(2) == [1, 3]

    kv = model.new_kv(4)
    cases = [
        lambda: model.forward(prompt, 0, kv, [0]),                    # table too short
        lambda: model.forward(prompt, 0, kv, [0, 1, 2, 9]),           # id past the cache
        lambda: model.forward([], 0, kv, [0]),                        # no tokens
        lambda: model.forward([300], 0, kv, [0]),                     # id past the vocabulary
        lambda: model.forward([1], 0, kv[:2], [0]),                   # layers missing
        lambda: model.forward([1], 0, [(k.half(), v) for k, v in kv], [0]),  # wrong dtype
        lambda: model.forward([1], "0", kv, [0]),                     # start not an int
    ]
    for case in cases:
        with pytest.raises(LLMException) as err:
            case()
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
