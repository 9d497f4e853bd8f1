"""A small Llama-style decoder (RMSNorm, rotary embeddings, grouped-query
attention, SwiGLU) with a paged KV cache, in plain torch.

The math is Hugging Face ``LlamaForCausalLM``'s (``state_dict()`` uses its
parameter names, so the same weights load there; tests/test_model.py
compares the logits). The KV cache is paged as in vLLM: per layer a K and a V
blocks tensor ``[num_blocks, block_tokens, num_kv_heads, head_dim]``, and
per request a block table (block ids, in token order). Token t of a request
lives in block ``table[t // block_tokens]``, row ``t % block_tokens``.
Attention writes the new tokens' K/V into their rows, then gathers the
request's K/V through the table: the blocks may be anywhere, so a decoder
can continue from blocks another process wrote into different ids.

Float32 throughout: transfers copy bytes, so a disaggregated run equals a
single-process one bit for bit whatever the dtype, provided both run the
same kernels on the same values (this module always gathers the same
shapes, whichever block ids hold the data). fp32 is what lets the
Hugging Face comparison hold to 1e-4 instead of fp16's ~1e-2 and keeps
greedy argmax ties away; torch's CPU fp16 matmuls are also slow. Processes
compared bit for bit should run the same torch with the same
``torch.set_num_threads`` (a GEMM's reduction split may follow the thread
count)."""
import math
from dataclasses import dataclass

import torch

from kvcache.checks import integer, invalid, public


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of the model (defaults: 4 layers, 8 query heads sharing 2 KV
    heads, about 0.6 M parameters)."""
    vocab_size: int = 258                # kvcache.demo.tokenizer.VOCAB_SIZE
    hidden_size: int = 128
    intermediate_size: int = 344
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    block_tokens: int = 16               # tokens per KV block

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "block_tokens"):
            integer(getattr(self, name), name, 1)
        if self.num_heads % self.num_kv_heads:
            raise invalid(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                          f"{self.num_kv_heads}")
        if self.head_dim % 2:
            raise invalid(f"head_dim {self.head_dim} must be even (rotary pairs)")

    @property
    def block_shape(self):
        """Per block: ``(block_tokens, num_kv_heads, head_dim)``."""
        return (self.block_tokens, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self):
        """Bytes of one block of one K or V tensor (fp32)."""
        return math.prod(self.block_shape) * 4


def init_weights(config, seed):
    """Deterministic weights from ``seed`` (same seed, same torch: same
    bits), named as Hugging Face's LlamaForCausalLM names them. Scales keep
    activations O(1) so the logits are peaked and greedy decoding is not a
    coin toss on rounding."""
    gen = torch.Generator().manual_seed(integer(seed, "seed", 0))
    c = config

    def normal(*shape, std):
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std

    def linear(out_features, in_features):
        return normal(out_features, in_features, std=in_features ** -0.5)

    def norm():
        return 1.0 + normal(c.hidden_size, std=0.1)

    w = {"model.embed_tokens.weight": normal(c.vocab_size, c.hidden_size, std=1.0)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = linear(c.num_heads * c.head_dim, c.hidden_size)
        w[p + "self_attn.k_proj.weight"] = linear(c.num_kv_heads * c.head_dim, c.hidden_size)
        w[p + "self_attn.v_proj.weight"] = linear(c.num_kv_heads * c.head_dim, c.hidden_size)
        w[p + "self_attn.o_proj.weight"] = linear(c.hidden_size, c.num_heads * c.head_dim)
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "mlp.gate_proj.weight"] = linear(c.intermediate_size, c.hidden_size)
        w[p + "mlp.up_proj.weight"] = linear(c.intermediate_size, c.hidden_size)
        w[p + "mlp.down_proj.weight"] = linear(c.hidden_size, c.intermediate_size)
    w["model.norm.weight"] = norm()
    w["lm_head.weight"] = linear(c.vocab_size, c.hidden_size) * 4.0
    return w


def _rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TinyLlama:
    """The model. ``kv`` arguments are ``[(K, V), ...]``, one pair per layer,
    each a contiguous float32 tensor ``[num_blocks, *config.block_shape]``
    (``kvcache.demo.paging.layer_views`` makes them from a blocks cache);
    ``block_table`` is a list of block ids covering the tokens so far.
    Bad arguments raise LLMException(LLM_PARAM_INVALID)."""

    def __init__(self, config=None, seed=0, weights=None):
        self.config = config or ModelConfig()
        self.weights = weights if weights is not None else init_weights(self.config, seed)
        c = self.config
        self._inv_freq = 1.0 / (c.rope_theta ** (
            torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))

    def state_dict(self):
        """The weights by Hugging Face LlamaForCausalLM parameter name."""
        return dict(self.weights)

    def new_kv(self, num_blocks):
        """Zeroed ``[(K, V), ...]`` torch tensors of ``num_blocks`` blocks
        (the single-process case; a server passes views of a registered
        blocks cache instead)."""
        shape = (integer(num_blocks, "num_blocks", 1), *self.config.block_shape)
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(self.config.num_layers)]

    def blocks_needed(self, num_tokens):
        """Blocks a request of ``num_tokens`` tokens (prompt + generated)
        needs in its block table."""
        n = integer(num_tokens, "num_tokens", 0)
        return -(-n // self.config.block_tokens)

    # -- the layers -----------------------------------------------------------------------

    def _rope(self, x, positions):
        freqs = positions.to(torch.float32)[:, None] * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]          # [T, 1, head_dim]
        return x * emb.cos() + _rotate_half(x) * emb.sin()

    def _qkv(self, layer, x, positions):
        c, p = self.config, f"model.layers.{layer}."
        h = _rms_norm(x, self.weights[p + "input_layernorm.weight"], c.rms_norm_eps)
        q = (h @ self.weights[p + "self_attn.q_proj.weight"].T).view(-1, c.num_heads,
                                                                       c.head_dim)
        k = (h @ self.weights[p + "self_attn.k_proj.weight"].T).view(-1, c.num_kv_heads,
                                                                       c.head_dim)
        v = (h @ self.weights[p + "self_attn.v_proj.weight"].T).view(-1, c.num_kv_heads,
                                                                       c.head_dim)
        return self._rope(q, positions), self._rope(k, positions), v

    def _attend(self, q, keys, values, positions):
        """Causal grouped-query attention of queries at ``positions`` over the
        keys/values of tokens 0..S-1 (``[S, num_kv_heads, head_dim]``)."""
        c = self.config
        group = c.num_heads // c.num_kv_heads
        keys = keys.transpose(0, 1).repeat_interleave(group, dim=0)       # [H, S, D]
        values = values.transpose(0, 1).repeat_interleave(group, dim=0)
        scores = (q.transpose(0, 1) @ keys.transpose(1, 2)) * c.head_dim ** -0.5
        future = torch.arange(keys.shape[1])[None, :] > positions[:, None]  # [T, S]
        scores = scores.masked_fill(future[None], float("-inf"))
        out = torch.softmax(scores, dim=-1) @ values                          # [H, T, D]
        return out.transpose(0, 1).reshape(q.shape[0], c.num_heads * c.head_dim)

    def _finish_layer(self, layer, x, attn):
        c, p = self.config, f"model.layers.{layer}."
        x = x + attn @ self.weights[p + "self_attn.o_proj.weight"].T
        h = _rms_norm(x, self.weights[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
        gate = torch.nn.functional.silu(h @ self.weights[p + "mlp.gate_proj.weight"].T)
        up = h @ self.weights[p + "mlp.up_proj.weight"].T
        return x + (gate * up) @ self.weights[p + "mlp.down_proj.weight"].T

    def _logits(self, x):
        x = _rms_norm(x, self.weights["model.norm.weight"], self.config.rms_norm_eps)
        return x @ self.weights["lm_head.weight"].T

    def _tokens(self, tokens):
        ids = torch.as_tensor(tokens, dtype=torch.long)
        if ids.ndim != 1 or ids.numel() == 0:
            raise invalid(f"tokens must be a non-empty 1-D sequence, got shape "
                          f"{tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise invalid(f"token ids must be in 0..{self.config.vocab_size - 1}")
        return ids

    def _check_kv(self, kv, table, end):
        c = self.config
        if len(kv) != c.num_layers:
            raise invalid(f"kv holds {len(kv)} layers, the model has {c.num_layers}")
        num_blocks = kv[0][0].shape[0]
        for pair in kv:
            for t in pair:
                if (t.dtype != torch.float32 or not t.is_contiguous()
                        or tuple(t.shape) != (num_blocks, *c.block_shape)):
                    raise invalid(f"each K/V must be a contiguous float32 tensor "
                                  f"{[num_blocks, *c.block_shape]}, got {t.dtype} "
                                  f"{list(t.shape)}")
        table = torch.as_tensor(list(table), dtype=torch.long)
        if table.numel() * c.block_tokens < end:
            raise invalid(f"block table of {table.numel()} blocks holds "
                          f"{table.numel() * c.block_tokens} tokens, {end} needed")
        if table.numel() and (int(table.min()) < 0 or int(table.max()) >= num_blocks):
            raise invalid(f"block ids must be in 0..{num_blocks - 1}")
        return table[:self.blocks_needed(end)]

    # -- public calls ---------------------------------------------------------------------

    @public
    @torch.no_grad()
    def forward(self, tokens, start, kv, block_table, on_layer=None):
        """Run ``tokens`` (token ids) at positions ``start..start+T-1`` of a
        request whose earlier tokens' K/V are in ``kv`` under
        ``block_table``; returns float32 logits ``[T, vocab_size]``.

        Per layer: the new K/V go into their block rows, then
        ``on_layer(layer, block_ids)`` is called (the ids of the blocks this
        call wrote, in token order) before the layer's attention reads the
        request's K/V back through the table: a sender hooked there can move
        layer L while layers L+1.. compute."""
        c = self.config
        ids = self._tokens(tokens)
        start = integer(start, "start", 0)
        end = start + ids.numel()
        table = self._check_kv(kv, block_table, end)
        positions = torch.arange(start, end)
        slots = table[positions // c.block_tokens] * c.block_tokens + positions % c.block_tokens
        written = table[start // c.block_tokens:].tolist()
        x = self.weights["model.embed_tokens.weight"][ids]
        for layer, (k_blocks, v_blocks) in enumerate(kv):
            q, k, v = self._qkv(layer, x, positions)
            k_rows = k_blocks.view(-1, c.num_kv_heads, c.head_dim)   # shares the blocks
            v_rows = v_blocks.view(-1, c.num_kv_heads, c.head_dim)
            k_rows[slots] = k
            v_rows[slots] = v
            if on_layer is not None:
                on_layer(layer, written)
            keys = k_blocks[table].view(-1, c.num_kv_heads, c.head_dim)[:end]
            values = v_blocks[table].view(-1, c.num_kv_heads, c.head_dim)[:end]
            x = self._finish_layer(layer, x, self._attend(q, keys, values, positions))
        return self._logits(x)

    @public
    @torch.no_grad()
    def forward_dense(self, tokens):
        """Logits ``[T, vocab_size]`` of a whole sequence without a cache
        (textbook causal attention over the fresh K/V): the reference the
        paged path is checked against."""
        ids = self._tokens(tokens)
        positions = torch.arange(ids.numel())
        x = self.weights["model.embed_tokens.weight"][ids]
        for layer in range(self.config.num_layers):
            q, k, v = self._qkv(layer, x, positions)
            x = self._finish_layer(layer, x, self._attend(q, k, v, positions))
        return self._logits(x)

    def prefill(self, prompt, kv, block_table, on_layer=None):
        """The prompt's K/V into its blocks, layer by layer (``on_layer`` as
        in ``forward``); returns the first generated token (greedy), what a
        prefill instance answers for ``max_tokens=1``."""
        return int(self.forward(prompt, 0, kv, block_table, on_layer)[-1].argmax())

    def decode(self, token, position, kv, block_table, max_new_tokens, eos_id=None):
        """Greedy decoding from ``token`` at ``position`` (the prompt length,
        when ``token`` is prefill's answer), the K/V of positions
        ``0..position-1`` being in ``kv`` under ``block_table``, which must
        hold ``position + max_new_tokens - 1`` tokens. Returns the tokens
        after ``token`` (at most ``max_new_tokens - 1``; stops after
        ``eos_id``)."""
        max_new = integer(max_new_tokens, "max_new_tokens", 1)
        out = []
        for step in range(max_new - 1):
            if eos_id is not None and token == eos_id:
                break
            token = int(self.forward([token], position + step, kv, block_table)[-1].argmax())
            out.append(token)
        return out

    def generate(self, prompt, max_new_tokens, kv, block_table, eos_id=None):
        """Greedy generation in one process: prefill then decode; returns
        the ``max_new_tokens`` (or fewer, up to ``eos_id``) new tokens."""
        first = self.prefill(prompt, kv, block_table)
        return [first] + self.decode(first, len(prompt), kv, block_table, max_new_tokens,
                                     eos_id)
