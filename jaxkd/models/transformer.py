"""The one decoder every family shares: attention, MLP, block and the scanned stack.

A family differs only by its `ModelConfig` switches (norm kind, biases, q/k norms over each head, parallel
residual, partial rotary, tied head). Layers are stacked on a leading "layers" axis and run under
`jax.lax.scan`, so compile time does not grow with depth; `remat` picks a rematerialisation policy for
the scanned block.

Attention is causal within documents: a token attends to earlier tokens with the same segment id. Padding
is segment 0, so real tokens never see it and packed rows never attend across documents.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxkd.models.attention import check_implementation, dot_product_attention
from jaxkd.models.config import ModelConfig
from jaxkd.models.layers import Embed, Linear, Norm, apply_rope, rope_cos_sin, split_key
from jaxkd.models.lora import REMAT_NAME, LoraConfig
from jaxkd.sharding import constrain

# Primitives of the fused attention kernels whose outputs (the attention output and its softmax statistics,
# which their backward needs) are worth keeping: cuDNN's forward, and Pallas calls (splash; the model has no
# other Pallas kernel). Not saved, the backward pass runs the attention forward of every layer again.
FUSED_ATTENTION_PRIMITIVES = ("dot_product_attention_fwd_wrapper", "dot_product_attention_fwd", "pallas_call")


def _lora(lora: LoraConfig | None, target: str) -> LoraConfig | None:
  """`lora` where it adapts projection `target` (a jaxkd.models.lora.TARGETS key), else None."""
  return lora if lora is not None and target in lora.targets else None


def _dots_no_batch_and_attention(prim, *args, **params) -> bool:
  return (prim.name in FUSED_ATTENTION_PRIMITIVES
          or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params))


def _and_lora_outputs(policy):
  """`policy`, saving also the LoRA projections' outputs (jaxkd.models.lora.REMAT_NAME): each stands for the dot
  it extends, which the policy would have saved."""
  return jax.checkpoint_policies.save_from_both_policies(
      policy, jax.checkpoint_policies.save_only_these_names(REMAT_NAME))


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": _and_lora_outputs(jax.checkpoint_policies.dots_saveable),
    "dots_no_batch": _and_lora_outputs(jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
    # dots_no_batch, and the fused attention kernels' outputs (the same as dots_no_batch on the XLA path).
    "dots_no_batch_attention": _and_lora_outputs(_dots_no_batch_and_attention),
}
# The same policies by how much of the forward the backward pass computes again, least first (and so by memory,
# most first): saving all dots keeps the [B, N, T, T] scores on the XLA path; "full" keeps only each layer's input.
REMAT_BY_COST = ("none", "dots", "dots_no_batch_attention", "dots_no_batch", "full")


class KVCache(NamedTuple):
  """Keys and values of every layer for generation; slots at and past `index` are still empty."""

  k: jax.Array  # [L, B, S, K, H]
  v: jax.Array  # [L, B, S, K, H]
  segment_ids: jax.Array  # [B, S]: 1 for real tokens, 0 for padding and empty slots
  index: jax.Array  # int32 scalar: the next slot to write


class ModelOutput(NamedTuple):
  logits: jax.Array | None  # [B, T, V], or None when not asked for
  last_hidden: jax.Array  # [B, T, D], after the final norm: the input of the output head
  # [L + 1, B, T, D] as transformers' `output_hidden_states`: the embeddings, the output of each layer but
  # the last, then the last layer's output after the final norm.
  hidden_states: jax.Array | None
  cache: KVCache | None = None  # the updated cache, when one was given


def positions_from_segments(segment_ids_BxT: jax.Array) -> jax.Array:
  """Position of each token inside its own document (0 at every document start)."""
  t = segment_ids_BxT.shape[1]
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids_BxT.shape)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids_BxT[:, :1], dtype=jnp.bool_), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]],
      axis=1)
  return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


class Attention(nnx.Module):
  """Grouped-query attention with rotary embeddings, optional biases and q/k norms over each head."""

  def __init__(self, cfg: ModelConfig, *, stack=(), param_dtype=jnp.float32, dtype=jnp.float32,
               attention: str = "auto", lora: LoraConfig | None = None, rngs: nnx.Rngs):
    d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(stack=stack, std=cfg.initializer_range, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
    self.q_proj = Linear(d, h * hd, axes=("embed", "q_heads"), bias=cfg.qkv_bias, lora=_lora(lora, "q"), **kw)
    self.k_proj = Linear(d, k * hd, axes=("embed", "kv_heads"), bias=cfg.qkv_bias, lora=_lora(lora, "k"), **kw)
    self.v_proj = Linear(d, k * hd, axes=("embed", "kv_heads"), bias=cfg.qkv_bias, lora=_lora(lora, "v"), **kw)
    self.o_proj = Linear(h * hd, d, axes=("q_heads", "embed"), bias=cfg.o_bias, lora=_lora(lora, "o"), **kw)
    nkw = dict(kind=cfg.norm, eps=cfg.norm_eps, bias=False, stack=stack, param_dtype=param_dtype, dtype=dtype,
               rngs=rngs)
    if cfg.qk_norm == "per_head":  # StableLM: a weight for every head
      self.q_layernorm = Norm((h, hd), axes=("heads", "head_dim"), **nkw)
      self.k_layernorm = Norm((k, hd), axes=("heads", "head_dim"), **nkw)
    elif cfg.qk_norm == "shared":  # Qwen3: one weight over head_dim, broadcast over the heads
      self.q_norm = Norm(hd, axes=("head_dim",), **nkw)
      self.k_norm = Norm(hd, axes=("head_dim",), **nkw)
    self.cfg, self.attention = cfg, attention  # attention: a jaxkd.models.attention implementation

  def __call__(self, x_BxTxD, cos, sin, segment_ids_BxT, kv_cache=None, dropout_key=None):
    """Without `kv_cache`: attention over these T tokens. With `kv_cache=(k_BxSxKxH, v_BxSxKxH, index,
    mask_Bx1xTxS)`: the new keys and values are written at [index, index + T) and the queries attend to
    the whole cache under `mask_Bx1xTxS`; returns (output, (k, v)) then. A mask of None means the cache holds
    nothing before these tokens (a prefill): they attend among themselves through the attention kernel.
    `dropout_key`: the LoRA adapters' dropout key while training."""
    cfg = self.cfg
    b, t, _ = x_BxTxD.shape
    kq, kk, kv, ko = split_key(dropout_key, 4)
    q_BxTxNxH = self.q_proj(x_BxTxD, kq).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k_BxTxKxH = self.k_proj(x_BxTxD, kk).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v_BxTxKxH = self.v_proj(x_BxTxD, kv).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm == "per_head":
      q_BxTxNxH, k_BxTxKxH = self.q_layernorm(q_BxTxNxH), self.k_layernorm(k_BxTxKxH)
    elif cfg.qk_norm == "shared":
      q_BxTxNxH, k_BxTxKxH = self.q_norm(q_BxTxNxH), self.k_norm(k_BxTxKxH)
    q_BxTxNxH = constrain(apply_rope(q_BxTxNxH, cos, sin), ("act_batch", "act_seq", "act_heads", None))
    k_BxTxKxH = apply_rope(k_BxTxKxH, cos, sin)
    if kv_cache is not None:
      k_cache, v_cache, index, cache_mask = kv_cache
      k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k_BxTxKxH.astype(k_cache.dtype), index, axis=1)
      v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v_BxTxKxH.astype(v_cache.dtype), index, axis=1)
      if cache_mask is None:
        out_BxTxNxH = dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT,
                                            scale=cfg.head_dim ** -0.5, implementation=self.attention)
      else:
        out_BxTxNxH = jax.nn.dot_product_attention(q_BxTxNxH, k_cache.astype(q_BxTxNxH.dtype),
                                                   v_cache.astype(q_BxTxNxH.dtype), mask=cache_mask,
                                                   scale=cfg.head_dim ** -0.5)
      return self.o_proj(out_BxTxNxH.reshape(b, t, cfg.num_heads * cfg.head_dim)), (k_cache, v_cache)
    out_BxTxNxH = dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT,
                                        scale=cfg.head_dim ** -0.5, implementation=self.attention)
    return self.o_proj(out_BxTxNxH.reshape(b, t, cfg.num_heads * cfg.head_dim), ko)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, *, stack=(), param_dtype=jnp.float32, dtype=jnp.float32,
               lora: LoraConfig | None = None, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    kw = dict(bias=cfg.mlp_bias, stack=stack, std=cfg.initializer_range, param_dtype=param_dtype,
              dtype=dtype, rngs=rngs)
    self.gate_proj = Linear(d, f, axes=("embed", "mlp"), lora=_lora(lora, "gate"), **kw)
    self.up_proj = Linear(d, f, axes=("embed", "mlp"), lora=_lora(lora, "up"), **kw)
    self.down_proj = Linear(f, d, axes=("mlp", "embed"), lora=_lora(lora, "down"), **kw)

  def __call__(self, x_BxTxD, dropout_key=None):
    kg, ku, kd = split_key(dropout_key, 3)
    h_BxTxF = jax.nn.silu(self.gate_proj(x_BxTxD, kg)) * self.up_proj(x_BxTxD, ku)
    return self.down_proj(constrain(h_BxTxF, ("act_batch", "act_seq", "act_mlp")), kd)


class Block(nnx.Module):
  """Pre-norm decoder layer, sequential (Llama, Qwen2) or parallel residual (StableLM option)."""

  def __init__(self, cfg: ModelConfig, *, stack=(), param_dtype=jnp.float32, dtype=jnp.float32,
               attention: str = "auto", lora: LoraConfig | None = None, rngs: nnx.Rngs):
    kw = dict(stack=stack, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
    norm = dict(kind=cfg.norm, eps=cfg.norm_eps, bias=cfg.norm_bias, axes=("norm",), **kw)
    self.input_layernorm = Norm(cfg.hidden_size, **norm)
    self.self_attn = Attention(cfg, attention=attention, lora=lora, **kw)
    if not cfg.parallel_residual:
      self.post_attention_layernorm = Norm(cfg.hidden_size, **norm)
    self.mlp = MLP(cfg, lora=lora, **kw)
    self.parallel_residual = cfg.parallel_residual

  def __call__(self, x_BxTxD, cos, sin, segment_ids_BxT, kv_cache=None, dropout_key=None):
    ka, km = split_key(dropout_key, 2)
    h_BxTxD = self.input_layernorm(x_BxTxD)
    attn_BxTxD = self.self_attn(h_BxTxD, cos, sin, segment_ids_BxT, kv_cache=kv_cache, dropout_key=ka)
    if kv_cache is not None:
      attn_BxTxD, new_kv = attn_BxTxD
    if self.parallel_residual:
      out = x_BxTxD + attn_BxTxD + self.mlp(h_BxTxD, km)
    else:
      x_BxTxD = x_BxTxD + attn_BxTxD
      out = x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD), km)
    return out if kv_cache is None else (out, new_kv)


class Transformer(nnx.Module):
  """Decoder-only language model. `model(input_ids)` gives logits; `model.forward` gives more.

  `lora` (jaxkd.models.lora.LoraConfig) adds low-rank adapters to the projections it targets.
  """

  def __init__(self, cfg: ModelConfig, *, param_dtype=jnp.float32, dtype=jnp.float32, remat: str = "none",
               attention: str = "auto", lora: LoraConfig | None = None, rngs: nnx.Rngs):
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat={remat!r}: expected one of {sorted(REMAT_POLICIES)}")
    check_implementation(attention)
    kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, std=cfg.initializer_range, **kw)
    self.layers = Block(cfg, stack=(cfg.num_layers,), attention=attention, lora=lora, **kw)
    self.norm = Norm(cfg.hidden_size, kind=cfg.norm, eps=cfg.norm_eps, bias=cfg.norm_bias, axes=("norm",), **kw)
    self.lm_head = (None if cfg.tie_embeddings else
                    Linear(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), bias=False,
                           std=cfg.initializer_range, **kw))
    self.cfg, self.dtype, self.remat, self.attention, self.lora = cfg, dtype, remat, attention, lora

  def head_kernel(self) -> jax.Array:
    """The output head [D, V] in the compute dtype (the embedding table, transposed, when tied)."""
    if self.lm_head is None:
      return self.embed_tokens.embedding[...].T.astype(self.dtype)
    return self.lm_head.kernel[...].astype(self.dtype)

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    cfg = self.cfg
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, self.dtype), v=jnp.zeros(shape, self.dtype),
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32), index=jnp.int32(0))

  def prefill(self, input_ids_BxT, attention_mask_BxT, max_len: int) -> ModelOutput:
    """The prompt rows (left-padded: `attention_mask` 0 on padding) through the model into a new KV cache of
    `max_len` slots; attention among the prompt's tokens runs through the model's attention kernel, as in
    training. The output carries the cache and no logits (a prompt's [B, T, vocab] would dwarf the rest: take the
    last position's from `last_hidden`); `forward(..., cache=out.cache)` appends further tokens."""
    ids = jnp.asarray(input_ids_BxT, jnp.int32)
    cache = self.init_cache(ids.shape[0], max_len)
    return self._forward_cached(ids, jnp.asarray(attention_mask_BxT, jnp.int32), cache, False, fresh=True)

  def _forward_cached(self, ids, segment_ids, cache: KVCache, compute_logits: bool, fresh: bool = False):
    """Appends T tokens to the cache: the prompt (left-padded, segment 0) at once, then one at a time; `fresh`:
    the cache is empty (a prefill), so the tokens attend among themselves through the attention kernel."""
    t = ids.shape[1]
    seen = jnp.sum(cache.segment_ids != 0, axis=1, keepdims=True)  # real tokens already in the cache
    positions = jnp.maximum(seen + jnp.cumsum(segment_ids != 0, axis=1) - 1, 0)
    cos, sin = rope_cos_sin(self.cfg, positions)
    kv_seg_BxS = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids, cache.index, axis=1)
    slots = jnp.arange(kv_seg_BxS.shape[1])
    causal_TxS = slots[None, :] <= cache.index + jnp.arange(t)[:, None]
    mask = (causal_TxS[None] & (kv_seg_BxS[:, None, :] == segment_ids[:, :, None]))[:, None]
    graphdef, layer_state = nnx.split(self.layers)

    def body(x, xs):
      one_layer_state, k_cache, v_cache = xs
      y, (k_cache, v_cache) = nnx.merge(graphdef, one_layer_state)(
          x, cos, sin, segment_ids, kv_cache=(k_cache, v_cache, cache.index, None if fresh else mask))
      return y, (k_cache, v_cache)

    x_BxTxD, (k, v) = jax.lax.scan(body, self.embed_tokens(ids), (layer_state, cache.k, cache.v))
    last_BxTxD = self.norm(x_BxTxD)
    logits = jnp.einsum("btd,dv->btv", last_BxTxD, self.head_kernel()) if compute_logits else None
    new_cache = KVCache(k=k, v=v, segment_ids=kv_seg_BxS, index=cache.index + t)
    return ModelOutput(logits=logits, last_hidden=last_BxTxD, hidden_states=None, cache=new_cache)

  def forward(self, input_ids_BxT, *, attention_mask=None, segment_ids=None, positions=None,
              output_hidden_states: bool = False, compute_logits: bool = True,
              cache: KVCache | None = None, dropout_key=None) -> ModelOutput:
    """Runs the decoder.

    Args:
      input_ids_BxT: int token ids.
      attention_mask: [B, T] 1 for real tokens, 0 for padding (left or right).
      segment_ids: [B, T] document ids of packed rows, 0 for padding; takes precedence over attention_mask.
      positions: [B, T] rotary positions; by default each token's index inside its document (or, with
        only an attention_mask, among the real tokens of its row).
      output_hidden_states: also return every layer's output, for hidden-state distillation.
      compute_logits: False skips the output head (the fused loss applies it chunk by chunk).
      cache: a `KVCache` (see `init_cache`) to append these tokens to, for generation; the output then
        carries the updated cache. Rows are single documents; `attention_mask` marks their padding.
      dropout_key: while training, the key of the LoRA adapters' dropout (each layer and projection draws its
        own mask from it); None drops nothing.
    """
    ids = jnp.asarray(input_ids_BxT, jnp.int32)
    if segment_ids is None:
      segment_ids = (jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32))
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    if cache is not None:
      return self._forward_cached(ids, segment_ids, cache, compute_logits)
    if positions is None:  # with left padding too, real tokens count from 0
      positions = positions_from_segments(segment_ids)
    cos, sin = rope_cos_sin(self.cfg, jnp.asarray(positions, jnp.int32))

    x0_BxTxD = constrain(self.embed_tokens(ids), ("act_batch", "act_seq", "act_embed"))
    graphdef, layer_state = nnx.split(self.layers)
    keys_L = None  # a dropout key for each layer, scanned with its weights
    if dropout_key is not None and self.lora is not None and self.lora.dropout > 0:
      keys_L = jax.random.split(dropout_key, self.cfg.num_layers)

    def body(x, xs):
      one_layer_state, key = xs
      y = nnx.merge(graphdef, one_layer_state)(x, cos, sin, segment_ids, dropout_key=key)
      y = constrain(y, ("act_batch", "act_seq", "act_embed"))
      return y, (y if output_hidden_states else None)

    if self.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
    x_BxTxD, per_layer_LxBxTxD = jax.lax.scan(body, x0_BxTxD, (layer_state, keys_L))
    last_BxTxD = self.norm(x_BxTxD)
    hidden = (jnp.concatenate([x0_BxTxD[None], per_layer_LxBxTxD[:-1], last_BxTxD[None]])
              if output_hidden_states else None)
    logits = None
    if compute_logits:
      logits = jnp.einsum("btd,dv->btv", last_BxTxD, self.head_kernel())
      logits = constrain(logits, ("act_batch", "act_seq", "act_vocab"))
    return ModelOutput(logits=logits, last_hidden=last_BxTxD, hidden_states=hidden)

  def __call__(self, input_ids_BxT, **kwargs) -> jax.Array:
    return self.forward(input_ids_BxT, **kwargs).logits
