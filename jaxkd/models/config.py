"""The frozen description of one decoder: sizes plus the switches that tell the families apart.

Every family file turns a Hugging Face `config.json` dict into a `ModelConfig` (and back). The helpers here
read the fields the families share, in both spellings found in the wild: hub configs (top-level
`rope_theta`, `rope_scaling`, `partial_rotary_factor`, `torch_dtype`) and transformers 5
(`rope_parameters`, `dtype`). Anything a config switches on that the shared decoder does not implement
raises `UnsupportedConfigError` naming the field, so a config never silently loads as a different model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
QK_NORMS = ("none", "per_head", "shared")

# Fields copied verbatim from the source config to the exported one: they change nothing in the
# forward pass but generation and serving read them.
PASSTHROUGH_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache")


class UnsupportedConfigError(ValueError):
  """A config.json field asks for something the shared decoder does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding: base, the fraction of each head that rotates, and the scaling rule."""

  theta: float = 10000.0
  fraction: float = 1.0  # StableLM's partial_rotary_factor
  type: str = "default"
  factor: float = 1.0
  # llama3
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int | None = None
  # yarn
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  truncate: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes and family switches of the shared decoder (hashable: modules keep it as static data)."""

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int
  norm: str = "rms"  # "rms" or "layer"
  norm_eps: float = 1e-6
  norm_bias: bool = False  # LayerNorm with a bias (StableLM)
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  # A norm (of kind `norm`, no bias) over each head of the queries and keys, before rotary: "none"; "per_head",
  # a weight for every head (StableLM's qk_layernorm); "shared", one [head_dim] weight for all heads (Qwen3).
  qk_norm: str = "none"
  parallel_residual: bool = False  # x + attn(ln(x)) + mlp(ln(x))
  tie_embeddings: bool = False
  rope: RopeConfig = RopeConfig()
  initializer_range: float = 0.02
  # (key, json-encoded value) pairs of PASSTHROUGH_FIELDS, kept for export.
  hf_passthrough: tuple[tuple[str, str], ...] = ()

  def __post_init__(self):
    if self.norm not in ("rms", "layer"):
      raise ValueError(f"norm={self.norm!r}: expected 'rms' or 'layer'")
    if self.qk_norm not in QK_NORMS:
      raise ValueError(f"qk_norm={self.qk_norm!r}: expected one of {QK_NORMS}")
    if self.num_heads % self.num_kv_heads:
      raise UnsupportedConfigError(
          f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads="
          f"{self.num_kv_heads}; grouped-query attention needs it to be")
    if self.rope.type not in ROPE_TYPES:
      raise UnsupportedConfigError(f"rope type {self.rope.type!r} is not implemented (known: {ROPE_TYPES})")

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.rope.fraction)

  def too_long(self, length: int, *, what: str, name: str, fix: str) -> str:
    """Why `length` positions (described by `what`) do not fit this model (`name`), or "" when they do: past
    max_position_embeddings the positions were never trained (and a rope scaling may not cover them)."""
    if length <= self.max_position_embeddings:
      return ""
    return f"{what} is longer than the {name}'s max_position_embeddings={self.max_position_embeddings}; {fix}"

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def passthrough(self) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in self.hf_passthrough}


# ----------------------------------------------------------------------------------------------------
# Reading HF config dicts (shared by the family files).


def check_fields(hf: dict, *, model_type: str, allowed: dict[str, tuple]) -> None:
  """Raises if `hf` sets a field to a value the decoder cannot honour.

  `allowed` maps a field name to the values that are fine (a missing field is fine).
  """
  if hf.get("model_type") != model_type:
    raise UnsupportedConfigError(f"model_type={hf.get('model_type')!r}, expected {model_type!r}")
  for key, ok in allowed.items():
    if key in hf and hf[key] not in ok:
      raise UnsupportedConfigError(
          f"config.json sets {key}={hf[key]!r}, which jaxkd's {model_type} port does not implement "
          f"(supported: {ok}); a model loaded without it would compute something else")
  if hf.get("quantization_config"):
    raise UnsupportedConfigError(
        "config.json has quantization_config: quantized checkpoints are not supported; "
        "load the unquantized (bf16/fp32) weights")
  for key in ("attention_dropout", "hidden_dropout", "mlp_dropout", "resid_dropout"):
    if float(hf.get(key) or 0.0) != 0.0:
      raise UnsupportedConfigError(
          f"config.json sets {key}={hf[key]}: dropout is not implemented (jaxkd trains without it); "
          f"set {key} to 0.0 in config.json to load this model")


def check_full_attention(hf: dict) -> None:
  """Refuses a config whose layers use sliding-window attention (not implemented), as transformers decides each
  layer's kind for Qwen2 and Qwen3: `layer_types` where given, else sliding from layer `max_window_layers` on
  when `use_sliding_window` is set with a `sliding_window`."""
  kinds = hf.get("layer_types")
  if not kinds:
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    first = hf.get("max_window_layers", 28)
    kinds = ["sliding_attention" if window is not None and i >= first else "full_attention"
             for i in range(hf["num_hidden_layers"])]
  sliding = [i for i, t in enumerate(kinds) if t != "full_attention"]
  if sliding:
    raise UnsupportedConfigError(
        f"config.json makes layers {sliding} {kinds[sliding[0]]!r} (layer_types, or use_sliding_window with "
        "sliding_window and max_window_layers): sliding-window attention is not implemented; a model loaded "
        "without it would compute something else. Set use_sliding_window=false and layer_types to full_attention")


def head_dim_of(hf: dict) -> int:
  head_dim = hf.get("head_dim")
  return int(head_dim) if head_dim else hf["hidden_size"] // hf["num_attention_heads"]


def torch_dtype_of(hf: dict) -> str | None:
  """The checkpoint's stored dtype, from `dtype` (transformers 5) or `torch_dtype` (hub)."""
  return hf.get("dtype") or hf.get("torch_dtype")


def rope_from_hf(hf: dict) -> RopeConfig:
  """Reads rotary settings from either spelling of config.json."""
  params = dict(hf.get("rope_parameters") or {})
  legacy = dict(hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  params_type = params.get("rope_type") or params.get("type") or "default"
  legacy_type = legacy.get("rope_type") or legacy.get("type") or "default"
  if params and legacy and params_type != legacy_type:
    raise UnsupportedConfigError(
        f"config.json has rope_parameters (rope_type={params_type!r}) and rope_scaling "
        f"(rope_type={legacy_type!r}) that disagree; keep only one of them")
  scaling = {k: v for k, v in {**legacy, **params}.items() if k not in ("rope_theta", "partial_rotary_factor")}
  rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
  scaling.pop("type", None)
  if rope_type not in ROPE_TYPES:
    raise UnsupportedConfigError(
        f"config.json rope_scaling/rope_parameters rope_type={rope_type!r} is not implemented "
        f"(supported: {', '.join(ROPE_TYPES)})")
  known = {f.name for f in dataclasses.fields(RopeConfig)}
  unknown = sorted(set(scaling) - known)
  if unknown:
    raise UnsupportedConfigError(
        f"config.json rope scaling fields {unknown} are not implemented for rope_type={rope_type!r}")
  if rope_type != "default" and "factor" not in scaling and rope_type != "yarn":
    raise UnsupportedConfigError(f"rope_type={rope_type!r} needs rope_scaling.factor in config.json")
  if rope_type == "llama3" and "original_max_position_embeddings" not in scaling:
    raise UnsupportedConfigError("rope_type='llama3' needs original_max_position_embeddings in rope_scaling")
  if rope_type == "yarn":
    scaling.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
    if scaling.get("factor") is None:
      scaling["factor"] = hf["max_position_embeddings"] / scaling["original_max_position_embeddings"]
  clean = {k: v for k, v in scaling.items() if v is not None}
  for key in ("beta_fast", "beta_slow"):  # HF treats 0/None as "use the default"
    if not clean.get(key, True):
      clean.pop(key)
  return RopeConfig(theta=float(theta), fraction=float(fraction), type=rope_type, **clean)


def rope_to_hf(rope: RopeConfig) -> dict:
  """The hub spelling (top-level rope_theta and rope_scaling), which every transformers version reads."""
  out: dict[str, Any] = {"rope_theta": rope.theta}
  if rope.type == "default":
    out["rope_scaling"] = None
  else:
    scaling: dict[str, Any] = {"rope_type": rope.type, "factor": rope.factor}
    if rope.type == "llama3":
      scaling.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                     original_max_position_embeddings=rope.original_max_position_embeddings)
    if rope.type == "yarn":
      scaling.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow,
                     original_max_position_embeddings=rope.original_max_position_embeddings,
                     truncate=rope.truncate)
      for key in ("attention_factor", "mscale", "mscale_all_dim"):
        if getattr(rope, key) is not None:
          scaling[key] = getattr(rope, key)
    out["rope_scaling"] = scaling
  return out


def passthrough_of(hf: dict) -> tuple[tuple[str, str], ...]:
  return tuple((k, json.dumps(hf[k])) for k in PASSTHROUGH_FIELDS if k in hf)


def yarn_attention_factor(rope: RopeConfig) -> float:
  """YaRN's cos/sin scale, inferred from the factor (and mscale) as transformers does."""
  if rope.attention_factor is not None:
    return float(rope.attention_factor)

  def get_mscale(scale, mscale=1.0):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

  if rope.mscale and rope.mscale_all_dim:
    return get_mscale(rope.factor, rope.mscale) / get_mscale(rope.factor, rope.mscale_all_dim)
  return get_mscale(rope.factor)
