"""LoRA adapters (Hu et al. 2021) on the decoder's projections: their settings, initialisation and merge.

A targeted projection `y = x @ W` becomes `y = x @ W + alpha / rank * dropout(x) @ A @ B`, A [in, rank] and
B [rank, out], stacked over the layers like W. As in PEFT, A starts Kaiming-uniform (PEFT's
`kaiming_uniform_(a=sqrt(5))`: U(-1/sqrt(in), 1/sqrt(in))) and B at zero, so training starts from the base
model exactly. The adapters are `flax.nnx.LoRAParam`s: `ADAPTERS` and `BASE` tell them apart from the frozen
weights (`nnx.state(model, ADAPTERS)`), which is how a run trains, checkpoints and exports them.

Why not a library's layer: flax's `nnx.LoRA` holds one unstacked [in, rank] pair with neither the alpha / rank
scale nor dropout, and qwix's `LoraProvider` creates its adapters by intercepting a first forward call, which fails
on this decoder (its stacked layers are split and merged inside `lax.scan`: IndexError in the scan, qwix 0.1.8,
flax 0.12.8) and wants an `rngs` argument in every call for dropout. Both together are a few lines here, on the
decoder's own `Linear` with its logical axes: A is sharded like the kernel's input axis, B like its output axis,
the rank axis ("lora_rank") never.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

# A target's short name (config student.lora.targets) -> the projection's path inside a layer. The last part is
# also the module name Hugging Face and PEFT use (target_modules).
TARGETS = {"q": ("self_attn", "q_proj"), "k": ("self_attn", "k_proj"), "v": ("self_attn", "v_proj"),
           "o": ("self_attn", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
           "down": ("mlp", "down_proj")}

ADAPTERS = nnx.LoRAParam
BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))

# The name (jax.ad_checkpoint.checkpoint_name) of an adapted projection's output, x @ W + scale * (x @ A) @ B: the
# rematerialisation policies that save dots save it too (jaxkd.models.transformer.REMAT_POLICIES). Otherwise the
# backward pass, which needs it (silu's, attention's), rebuilds it from both its dots, x @ W and (x @ A) @ B, and
# saves both: a step's saved activations grew by half (Qwen2-1.5B, 4 x 2048 tokens: 29.8 -> 42.6 GiB on a CPU).
REMAT_NAME = "lora_projection"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """A LoRA student's adapters (hashable: part of the model's static structure). Built by `settings`."""

  rank: int
  alpha: float
  dropout: float  # on the adapter's input, while training only (a step passes a key)
  targets: tuple[str, ...]  # keys of TARGETS

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def modules(self) -> list[str]:
    """The targeted projections' Hugging Face module names (PEFT's target_modules), in TARGETS order."""
    return [TARGETS[t][1] for t in TARGETS if t in self.targets]


def parse_targets(text: str) -> tuple[str, ...]:
  """"q,v,down" -> ("q", "v", "down"); ValueError naming what is wrong with it."""
  names = [t.strip() for t in str(text).split(",") if t.strip()]
  unknown = [t for t in names if t not in TARGETS]
  if unknown or not names or len(set(names)) != len(names):
    what = f"{unknown} unknown" if unknown else ("empty" if not names else "a target is named twice")
    raise ValueError(f"{what}; use a comma-separated subset of {','.join(TARGETS)}")
  return tuple(t for t in TARGETS if t in names)


def settings(lora_cfg) -> LoraConfig | None:
  """The LoraConfig of `config.student.lora` (checked by config_base.validate); None where rank is 0 (off)."""
  if not lora_cfg.rank:
    return None
  return LoraConfig(rank=int(lora_cfg.rank), alpha=float(lora_cfg.alpha), dropout=float(lora_cfg.dropout),
                    targets=parse_targets(lora_cfg.targets))


def a_init(key, shape, dtype):
  """PEFT's initialisation of A (kaiming_uniform_ with a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)); shape [..., in, r]."""
  bound = 1.0 / math.sqrt(shape[-2])
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def dropout(x, rate: float, key):
  """Inverted dropout of the adapter's input (as torch.nn.Dropout in PEFT); no key or rate 0: x itself."""
  if key is None or rate <= 0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def delta(a_IxR, b_RxO, scale: float):
  """The adapter's update of a kernel, scale * A @ B, in float32 (stacked: [..., in, out])."""
  return scale * jnp.einsum("...ir,...ro->...io", a_IxR.astype(jnp.float32), b_RxO.astype(jnp.float32))


def merged_kernel(kernel_IxO, a_IxR, b_RxO, scale: float):
  """W + scale * A @ B in float32: the kernel of a model without adapters that computes what W and its adapter
  compute (up to rounding)."""
  return kernel_IxO.astype(jnp.float32) + delta(a_IxR, b_RxO, scale)
