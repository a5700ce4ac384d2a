"""Building blocks of the decoder: dense, embedding, norms and rotary embeddings.

Parameters carry logical axis names in their `axes` metadata ("embed", "mlp", "vocab", ...); only
`jaxkd.sharding` maps those names onto mesh axes. A `stack` argument prepends leading dimensions (the
"layers" axis of the scanned decoder) so one module holds the weights of every layer.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxkd.models import lora as lora_lib
from jaxkd.models.config import ModelConfig, RopeConfig, yarn_attention_factor
from jaxkd.sharding import constrain


def _param(rngs: nnx.Rngs | None, init, shape, dtype, axes, kind=nnx.Param) -> nnx.Param:
  value = init(rngs.params(), shape, dtype) if rngs is not None else init(None, shape, dtype)
  return kind(value, axes=tuple(axes))


def split_key(key, n: int) -> tuple:
  """n keys from `key`, or n Nones without one (no dropout: evaluation, sampling)."""
  return tuple(jax.random.split(key, n)) if key is not None else (None,) * n


def _normal(std):
  return lambda key, shape, dtype: (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _const(c):
  return lambda key, shape, dtype: jnp.full(shape, c, dtype)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel is [in, out] (HF stores [out, in]: the loader transposes).

  With `lora` (jaxkd.models.lora), a low-rank adapter beside the kernel: y += alpha / rank * dropout(x) @ A @ B,
  A [in, rank] sharded like the kernel's input axis, B [rank, out] like its output axis.
  """

  def __init__(self, d_in: int, d_out: int, *, axes: tuple[str, str], bias: bool, stack=(), std=0.02,
               param_dtype=jnp.float32, dtype=jnp.float32, lora: lora_lib.LoraConfig | None = None,
               rngs: nnx.Rngs):
    shape_stack, axes_stack = tuple(stack), ("layers",) * len(stack)
    self.kernel = _param(rngs, _normal(std), (*shape_stack, d_in, d_out), param_dtype, (*axes_stack, *axes))
    self.bias = (_param(rngs, _const(0.0), (*shape_stack, d_out), param_dtype, (*axes_stack, axes[1]))
                 if bias else None)
    r = lora.rank if lora is not None else 0
    self.lora_a = (_param(rngs, lora_lib.a_init, (*shape_stack, d_in, r), param_dtype,
                          (*axes_stack, axes[0], "lora_rank"), kind=lora_lib.ADAPTERS) if r else None)
    self.lora_b = (_param(rngs, _const(0.0), (*shape_stack, r, d_out), param_dtype,
                          (*axes_stack, "lora_rank", axes[1]), kind=lora_lib.ADAPTERS) if r else None)
    self.lora = lora
    self.dtype = dtype

  def __call__(self, x, dropout_key=None):
    """`dropout_key`: the adapter's dropout key while training; None (evaluation, sampling) drops nothing."""
    x = x.astype(self.dtype)
    y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora_a is not None:  # PEFT's order: base(x) + B(A(dropout(x))) * scale
      h = lora_lib.dropout(x, self.lora.dropout, dropout_key)
      h_xR = jnp.einsum("...i,ir->...r", h, self.lora_a[...].astype(self.dtype))
      y = y + jnp.einsum("...r,ro->...o", h_xR, self.lora_b[...].astype(self.dtype)) * self.lora.scale
      y = checkpoint_name(y, lora_lib.REMAT_NAME)
    return y


class Embed(nnx.Module):
  """Token embedding table [vocab, embed]; `attend` reuses it as a tied output head."""

  def __init__(self, vocab: int, width: int, *, std=0.02, param_dtype=jnp.float32, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.embedding = _param(rngs, _normal(std), (vocab, width), param_dtype, ("vocab", "embed"))
    self.dtype = dtype

  def __call__(self, ids):
    # Gathered over "fsdp" first, as every weight is for use: looking rows up in a table whose width is split
    # over the axis that also splits the batch leaves XLA no efficient layout for the result (it replicates
    # the whole [B, T, D] lookup and slices it: "involuntary full rematerialization").
    table_VxD = constrain(self.embedding[...], ("vocab", None))
    return jnp.take(table_VxD, ids, axis=0).astype(self.dtype)


class Norm(nnx.Module):
  """RMSNorm or LayerNorm over the last axis, computed in float32 like transformers does.

  `shape` is the normalised feature shape with any leading per-head dims, e.g. (heads, head_dim) for
  StableLM's per-head query/key norms.
  """

  def __init__(self, shape, *, kind: str, eps: float, bias: bool, axes, stack=(), param_dtype=jnp.float32,
               dtype=jnp.float32, rngs: nnx.Rngs):
    shape = (*stack, *((shape,) if isinstance(shape, int) else shape))
    axes = (*("layers",) * len(stack), *axes)
    self.scale = _param(rngs, _const(1.0), shape, param_dtype, axes)
    self.bias = _param(rngs, _const(0.0), shape, param_dtype, axes) if bias else None
    self.kind, self.eps, self.dtype = kind, eps, dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    if self.kind == "rms":
      y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
      # Llama/Qwen2: normalise in float32, cast back, then scale in the compute dtype.
      return self.scale[...].astype(self.dtype) * y.astype(self.dtype)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


# ----------------------------------------------------------------------------------------------------
# Rotary embeddings.


def rope_inv_freq(rope: RopeConfig, rotary_dim: int, max_positions: int) -> tuple[np.ndarray, float]:
  """Static inverse frequencies [rotary_dim // 2] and the cos/sin scale, for every type but `dynamic`."""
  exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
  inv_freq = (np.float32(1.0) / (np.float32(rope.theta) ** exponents)).astype(np.float32)
  if rope.type in ("default", "dynamic"):
    return inv_freq, 1.0
  if rope.type == "linear":
    return (inv_freq / np.float32(rope.factor)).astype(np.float32), 1.0
  if rope.type == "llama3":
    old_context = rope.original_max_position_embeddings
    low_wavelen = old_context / rope.low_freq_factor
    high_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32), 1.0
  if rope.type == "yarn":
    return _yarn_inv_freq(rope, rotary_dim), yarn_attention_factor(rope)
  raise ValueError(f"unknown rope type {rope.type!r}")


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> np.ndarray:
  def correction_dim(rotations):
    return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
        2 * math.log(rope.theta))

  low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
  if rope.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # as transformers: avoids dividing by zero
  pos_freqs = np.float32(rope.theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
  extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (np.float32(rope.factor) * pos_freqs)
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  keep = 1 - ramp
  return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)


def rope_cos_sin(cfg: ModelConfig, positions_BxT: jax.Array):
  """cos and sin [B, T, rotary_dim] in float32 for integer positions."""
  rope, dim = cfg.rope, cfg.rotary_dim
  inv_freq, scale = rope_inv_freq(rope, dim, cfg.max_position_embeddings)
  inv_freq = jnp.asarray(inv_freq)
  if rope.type == "dynamic":
    # NTK scaling grows the base with the longest sequence in the batch, as transformers does.
    max_pos = cfg.max_position_embeddings
    seq_len = jnp.maximum(jnp.max(positions_BxT) + 1, max_pos).astype(jnp.float32)
    base = rope.theta * ((rope.factor * seq_len / max_pos) - (rope.factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  freqs_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs_BxTxF, freqs_BxTxF], axis=-1)
  return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x_BxTxNxH: jax.Array, cos_BxTxR: jax.Array, sin_BxTxR: jax.Array) -> jax.Array:
  """Rotates the first R features of each head (rotate-half layout); the rest pass through."""
  rot_dim = cos_BxTxR.shape[-1]
  x_rot, x_pass = x_BxTxNxH[..., :rot_dim], x_BxTxNxH[..., rot_dim:]
  cos, sin = cos_BxTxR[:, :, None, :].astype(x_rot.dtype), sin_BxTxR[:, :, None, :].astype(x_rot.dtype)
  half = rot_dim // 2
  rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  out = x_rot * cos + rotated * sin
  return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out
