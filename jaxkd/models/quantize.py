"""A weight-only int8 teacher: its decoder's linear layers stored as int8 with a float32 scale per output channel.

`quantize(model, "int8")` swaps each of the decoder's projections (q, k, v, o, gate, up, down) for a `QLinear`:
kernel `[layers, in, out]` int8 and scale `[layers, 1, out]` float32 (absmax / 127.5 over the input axis, so
kernel * scale is the weight within half a step), both parameters with the logical axes of the weight they
replace, so the one table in `jaxkd.sharding` places them and the scanned stack slices them like any weight. The
matmul dequantises on the fly (`int8 -> float32 * scale -> compute dtype`, which XLA fuses into the dot's operand):
int8 in HBM and over FSDP's weight gathers, bf16 or float32 arithmetic.

The embedding table and the output head stay in the compute dtype. On the bundled teacher's held-out tokens an int8
head adds a quarter to the mean KL from the float teacher and an int8 embedding three fifths, and quadruples the worst
token's (BENCHMARKS.md, "An int8 teacher"); the head's rounding goes straight into the logits the student learns from,
and the fused loss takes the head as a dense [D, V] array, so an int8 head would come back as a dequantised temporary
of its bf16 size each step. Together they are 3% (Llama-3.1-70B) to 14% (Qwen2-7B) of a teacher's weights.

The numerics are qwix's (`qwix.quantize`, `qwix.dequantize`: Google's JAX quantization library): its model-level PTQ
intercepts the matmuls of a module's own parameters, which the scanned decoder never exposes (each layer is a fresh
module merged inside `lax.scan`), so quantising this model through `qwix.quantize_model` stores no int8 weight at all;
its array-level API gives the same QArray format with our parameters and shardings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from jax.sharding import NamedSharding

from jaxkd import sharding as shd
from jaxkd.models.layers import Linear

MODES = ("", "int8")  # "": the teacher as loaded
# The decoder's linear layers a quantised model stores in int8, by block part.
TARGETS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def mode_problem(mode: str) -> str:
  """Why `mode` is no quantisation mode, or ""."""
  if mode in MODES:
    return ""
  return ("unknown; use \"int8\" (weight-only int8 with a scale per output channel for the teacher's linear layers) "
          "or \"\" (off)")


class Scale(nnx.Param):
  """A QLinear's per-channel scales: a parameter (sharded, passed to the step) that no checkpoint file holds."""


class QLinear(nnx.Module):
  """y = x @ (kernel * scale) (+ bias): `Linear` with an int8 kernel [..., in, out] and scales [..., 1, out]."""

  def __init__(self, kernel: nnx.Param, scale: Scale, bias: nnx.Param | None, dtype, float_dtype):
    self.kernel, self.scale, self.bias, self.dtype = kernel, scale, bias, dtype
    self.float_dtype = float_dtype  # the replaced kernel's: a loader reads the checkpoint's weight in it

  def __call__(self, x, dropout_key=None):
    del dropout_key  # `Linear`'s signature; a quantised layer has no LoRA adapter to drop out
    # Gathered whole over the mesh axes that also split the batch (FSDP), as XLA gathers a float weight for its
    # matmul, but as int8 (kernel and scales), and dequantised after: left to itself, XLA dequantises each shard and
    # gathers the float product, twice the bytes on the wire and in the gathered copy.
    axes_IxO = _gathered(self.kernel.get_metadata()["axes"][-2:])
    kernel_IxO = shd.constrain(self.kernel[...], axes_IxO)
    scale_1xO = shd.constrain(self.scale[...], (None, axes_IxO[1]))
    # Dequantised in float32 and rounded once to the compute dtype: a bf16 scale would add its own rounding.
    w_IxO = qwix.dequantize(qwix.QArray(kernel_IxO, scale_1xO, qtype=jnp.int8)).astype(self.dtype)
    y = jnp.einsum("...i,io->...o", x.astype(self.dtype), w_IxO)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def _gathered(axes) -> tuple:
  """Logical `axes` without those split over the batch's mesh axes: the layout a matmul gathers a weight to."""
  batch = set(shd.mesh_axes_of("act_batch"))
  return tuple(None if a is not None and set(shd.mesh_axes_of(a)) & batch else a for a in axes)


def quantize_kernel(kernel_IxO: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(int8 kernel, float32 scale) of a float kernel [..., in, out]: one scale per output channel (and layer)."""
  per_channel = tuple(a for a in range(kernel_IxO.ndim) if a != kernel_IxO.ndim - 2)
  q = qwix.quantize(kernel_IxO.astype(jnp.float32), jnp.int8, channelwise_axes=per_channel)
  return q.qvalue, q.scale


def _scale_axes(kernel_axes) -> tuple:
  return (*kernel_axes[:-2], None, kernel_axes[-1])


def _scale_shape(kernel_shape) -> tuple:
  return (*kernel_shape[:-2], 1, kernel_shape[-1])


def quantize_value(value: jax.Array, kernel_axes) -> tuple[jax.Array, jax.Array]:
  """`quantize_kernel` on the devices `value` lives on: the int8 kernel keeps its sharding, the scale gets its own
  from the logical axes."""
  sharding = value.sharding
  if isinstance(sharding, NamedSharding):
    scale_sharding = shd.named_sharding(sharding.mesh, _scale_axes(kernel_axes), _scale_shape(value.shape))
  else:
    scale_sharding = sharding
  return jax.jit(quantize_kernel, out_shardings=(sharding, scale_sharding))(value)


def quantize_linear(linear: Linear) -> QLinear:
  """The QLinear of `linear` (abstract for an abstract one)."""
  if linear.lora_a is not None:
    raise ValueError("an int8 layer has no LoRA adapter: quantize a teacher, not a LoRA student")
  var = linear.kernel
  axes = var.get_metadata()["axes"]
  value = var.get_value()
  if isinstance(value, jax.ShapeDtypeStruct):  # an abstract model: shapes only
    q = jax.ShapeDtypeStruct(value.shape, jnp.int8)
    s = jax.ShapeDtypeStruct(_scale_shape(value.shape), jnp.float32)
  else:
    q, s = quantize_value(value, axes)
  return QLinear(nnx.Param(q, axes=axes), Scale(s, axes=_scale_axes(axes)), linear.bias, linear.dtype,
                 jnp.dtype(value.dtype))


def quantize(model, mode: str):
  """`model` (a `Transformer`, concrete or abstract) with its decoder's linear layers in `mode`, in place; returned.
  A concrete model's float kernels are quantised on their devices, one at a time, and released."""
  problem = mode_problem(mode)
  if problem:
    raise ValueError(f"quantize={mode!r}: {problem}")
  if not mode:
    return model
  for part, names in TARGETS.items():
    block_part = getattr(model.layers, part)
    for name in names:
      linear = getattr(block_part, name)
      if isinstance(linear, Linear):
        setattr(block_part, name, quantize_linear(linear))
  return model


def quantized_kernels(model) -> dict[str, QLinear]:
  """{parameter path of an int8 kernel ("layers.mlp.up_proj.kernel"): its QLinear}: what a loader reads in float
  and quantises (`jaxkd.models.hf_io.load_params`)."""
  out = {}
  for part, names in TARGETS.items():
    for name in names:
      module = getattr(getattr(model.layers, part), name)
      if isinstance(module, QLinear):
        out[f"layers.{part}.{name}.kernel"] = module
  return out


def is_quantized(model) -> bool:
  return bool(quantized_kernels(model))
