"""Causal attention within packed documents, through the fastest kernel the backend has.

`dot_product_attention(q, k, v, segment_ids, scale=..., implementation="auto")` is the one entry point: a
token attends to earlier tokens of its own segment (document). Padding is segment 0 and attends only to
padding, so no softmax row is ever empty. Grouped-query attention: the query heads N are a multiple of the
key/value heads K; query head n reads key/value head n // (N / K).

  xla     `jax.nn.dot_product_attention` with a dense [B, 1, T, T] boolean mask. Any backend, any dtype.
  cudnn   cuDNN flash attention, `jax.nn.dot_product_attention(implementation="cudnn")`: `is_causal` selects
          cuDNN's causal mask type (blocks above the diagonal are skipped), and the same-segment mask goes
          in as `mask`, which jax turns into an additive [B, 1, T, T] bias. NVIDIA GPUs of compute
          capability 8.0 or more; bfloat16/float16 only; head dim a multiple of 8 and at most 128 (256 from
          Hopper); even T (cuDNN's backward with a bias).
  splash  the Pallas TPU splash-attention kernel with `SegmentIds` and a causal mask, one kernel call per
          row under `vmap`. Under a mesh it runs per shard inside `shard_map`: rows split over the (data,
          fsdp) axes, heads over tensor (key/value heads are repeated when the tensor axis does not divide
          them). T a multiple of 128.
  auto    cudnn on a CUDA GPU, splash on a TPU, xla elsewhere, decided at trace time from the platform
          of the active mesh's devices (else `jax.default_backend()`): compiled for a TPU topology from a
          CPU host, it is splash; where the preferred kernel cannot take these inputs (float32 on a GPU, an
          unsupported head dim or length) it falls back to xla and logs why, once.

`choose_implementation` holds every rule that decides, as a pure function of the backend and the shapes,
so the fallbacks are unit-tested on a CPU. Asking explicitly for a kernel of another backend (cudnn on a
CPU) is an error rather than a silent fallback; asking for one that cannot take these inputs falls back.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxkd import sharding as shd

log = logging.getLogger("jaxkd")

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
NATIVE_BACKEND = {"cudnn": "gpu", "splash": "tpu"}
CUDNN_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))
SPLASH_BLOCKS = (512, 256, 128)  # tile sizes tried, largest first; T must be a multiple of the last
HEAD_AXES = ("act_batch", "act_seq", "act_heads", None)


class Choice(NamedTuple):
  implementation: str  # "xla", "cudnn" or "splash": what runs
  reason: str  # why, when that is not simply what was asked for; "" otherwise


def check_implementation(name: str) -> str:
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"attention={name!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
  return name


def _cudnn_problem(*, cuda, cudnn, capability, dtype, head_dim, q_len, kv_len) -> str:
  """Why cuDNN flash attention cannot take these inputs (the checks of jax's cudnn module), or ""."""
  if not cuda:
    return "the GPU is not an NVIDIA/CUDA one"
  if not cudnn:
    return "cuDNN was not found"
  if np.dtype(dtype) not in CUDNN_DTYPES:
    return (f"dtype {np.dtype(dtype).name}: cuDNN flash attention takes bfloat16 or float16 only (set the "
            "model's compute dtype to bfloat16)")
  if capability is not None and tuple(capability) < (8, 0):
    return f"compute capability {'.'.join(map(str, capability))} < 8.0"
  h_max = 256 if capability is not None and tuple(capability) >= (9, 0) else 128
  if head_dim % 8 or head_dim > h_max:
    return f"head dim {head_dim}: cuDNN needs a multiple of 8 that is at most {h_max} on this GPU"
  if q_len != kv_len:
    return f"query length {q_len} != key length {kv_len}"
  if q_len % 2:
    return f"odd sequence length {q_len}: cuDNN's backward with a mask/bias needs an even length"
  return ""


def _splash_problem(*, q_len, kv_len) -> str:
  if q_len != kv_len:
    return f"query length {q_len} != key length {kv_len}"
  if q_len % SPLASH_BLOCKS[-1]:
    return f"sequence length {q_len} is not a multiple of {SPLASH_BLOCKS[-1]} (the kernel's tile)"
  return ""


def choose_implementation(requested: str, *, backend: str, dtype, head_dim: int, q_len: int, kv_len: int,
                          cuda: bool = True, cudnn: bool = True, capability: tuple[int, int] | None = None,
                          interpret: bool = False) -> Choice:
  """Which kernel runs for `requested` on `backend` ("cpu", "gpu", "tpu") with these inputs, and why.

  `cuda`, `cudnn` and `capability` describe a GPU (ignored elsewhere); `interpret` lets splash run anywhere
  in Pallas interpret mode (tests).
  """
  check_implementation(requested)
  if requested == "xla":
    return Choice("xla", "")
  if requested == "auto":
    want = {"gpu": "cudnn", "tpu": "splash"}.get(backend)
    if want is None:
      return Choice("xla", f"backend {backend} has no fused attention kernel")
  else:
    want = requested
    if backend != NATIVE_BACKEND[want] and not (want == "splash" and interpret):
      raise ValueError(
          f"attention={want!r} runs on {NATIVE_BACKEND[want].upper()} only but the backend is {backend}; "
          "use attention='auto' (picks the kernel of each backend) or 'xla'")
  if want == "cudnn":
    problem = _cudnn_problem(cuda=cuda, cudnn=cudnn, capability=capability, dtype=dtype, head_dim=head_dim,
                             q_len=q_len, kv_len=kv_len)
  else:
    problem = _splash_problem(q_len=q_len, kv_len=kv_len)
  if problem:
    return Choice("xla", f"{want} cannot run: {problem}; using xla")
  return Choice(want, "")


@functools.lru_cache(maxsize=None)
def _gpu_facts() -> dict:
  dev = jax.devices()[0]
  cap = getattr(dev, "compute_capability", None)
  version = str(getattr(dev.client, "platform_version", "")).lower()  # names CUDA, or ROCm on AMD GPUs
  facts = {"cuda": "cuda" in version or "nvidia" in dev.device_kind.lower(),
           "capability": tuple(int(x) for x in str(cap).split(".")) if cap else None, "cudnn": False}
  try:  # the check jax.nn's cudnn path runs first; it raises without cuDNN
    from jax._src.cudnn import fused_attention_stablehlo  # pylint: disable=import-outside-toplevel
    facts["cudnn"] = bool(fused_attention_stablehlo.check_cudnn_version())
  except Exception:  # noqa: BLE001  (any failure means: no usable cuDNN)
    pass
  return facts


def target_backend() -> str:
  """The platform the traced program is for: the active mesh's devices when there is a mesh (a TPU topology
  compiled from a CPU host is a TPU program), else this process's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and getattr(mesh, "abstract_device", None) is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


def implementation_for(requested: str, *, dtype, head_dim: int, q_len: int, kv_len: int,
                       interpret: bool = False) -> Choice:
  """`choose_implementation` for the target's backend (`target_backend`; and a GPU's facts)."""
  backend = target_backend()
  facts = _gpu_facts() if backend == "gpu" else {}
  return choose_implementation(requested, backend=backend, dtype=dtype, head_dim=head_dim, q_len=q_len,
                               kv_len=kv_len, interpret=interpret, **facts)


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
  log.warning("attention: %s", message)


# ----------------------------------------------------------------------------------------------------
# The entry point.


def segment_mask(segment_ids_BxT: jax.Array) -> jax.Array:
  """[B, 1, T, T] boolean: causal and within the same segment (padding, segment 0, only sees padding)."""
  t = segment_ids_BxT.shape[1]
  causal_TxT = jnp.tril(jnp.ones((t, t), dtype=jnp.bool_))
  same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return (causal_TxT[None] & same_BxTxT)[:, None]


def dot_product_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                          segment_ids_BxT: jax.Array, *, scale: float, implementation: str = "auto",
                          interpret: bool = False) -> jax.Array:
  """[B, T, N, H] attention output; causal within segments (see the module docstring).

  Args:
    q_BxTxNxH, k_BxSxKxH, v_BxSxKxH: queries, keys, values (S = T: self-attention; N a multiple of K).
    segment_ids_BxT: int document ids, 0 for padding.
    scale: multiplies the logits (usually head_dim ** -0.5).
    implementation: "auto", "xla", "cudnn" or "splash".
    interpret: run the splash kernel in Pallas interpret mode (any backend; slow; for tests).
  """
  _, t, n, h = q_BxTxNxH.shape
  s, k = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
  if n % k:
    raise ValueError(f"{n} query heads are not a multiple of {k} key/value heads")
  choice = implementation_for(implementation, dtype=q_BxTxNxH.dtype, head_dim=h, q_len=t, kv_len=s,
                              interpret=interpret)
  if choice.reason and target_backend() in ("gpu", "tpu"):
    _log_once(f"{implementation} on {target_backend()}: {choice.reason}")
  segment_ids_BxT = jnp.asarray(segment_ids_BxT, jnp.int32)
  if choice.implementation == "cudnn":
    return _cudnn(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, scale)
  if choice.implementation == "splash":
    return _splash(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, scale, interpret)
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=segment_mask(segment_ids_BxT),
                                      scale=scale, implementation="xla")


# ----------------------------------------------------------------------------------------------------
# Kernels.


def _head_spec(q_BxTxNxH, k_heads: int):
  """(spec of q, k and v under the active mesh or None, whether k/v must be repeated to N heads).

  Fused kernels see each shard's heads only, so a key/value head must live with its query heads: where the
  mesh's head axis divides the query heads but not the key/value heads, keys and values are repeated.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None, False
  spec = shd.logical_to_spec(HEAD_AXES, q_BxTxNxH.shape, mesh)
  head_axes = spec[2] if isinstance(spec[2], tuple) else (spec[2],) if spec[2] else ()
  split = math.prod(mesh.shape[a] for a in head_axes)
  return spec, k_heads % split != 0


def _repeat_kv(x_BxSxKxH, n: int):
  return jnp.repeat(x_BxSxKxH, n // x_BxSxKxH.shape[2], axis=2)


def _cudnn(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, scale):
  spec, repeat = _head_spec(q_BxTxNxH, k_BxSxKxH.shape[2])
  if spec is not None:  # cuDNN's partitioner wants q, k and v sharded alike (and T, H unsplit)
    if repeat:
      n = q_BxTxNxH.shape[2]
      k_BxSxKxH, v_BxSxKxH = _repeat_kv(k_BxSxKxH, n), _repeat_kv(v_BxSxKxH, n)
    q_BxTxNxH, k_BxSxKxH, v_BxSxKxH = (jax.lax.with_sharding_constraint(x, spec)
                                       for x in (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH))
  same_Bx1xTxS = (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=same_Bx1xTxS, scale=scale,
                                      is_causal=True, implementation="cudnn")


@functools.lru_cache(maxsize=None)
def _splash_kernel(t: int, heads: int, interpret: bool):
  # Imported here: Pallas' TPU modules are only needed where splash runs.
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=import-outside-toplevel
  block = next(bs for bs in SPLASH_BLOCKS if t % bs == 0)
  sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  mask = sa.MultiHeadMask([sa.CausalMask((t, t)) for _ in range(heads)])
  build = lambda: sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
  # Built in a thread of its own: JAX's trace and mesh contexts are per thread, so its block tables become
  # concrete arrays on this host's default device, whatever trace or mesh asked first (under a mesh of a TPU
  # topology compiled from a CPU host, building them in place fails: those devices cannot hold arrays).
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(build).result()


def _splash_local(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, scale, interpret):
  from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds  # pylint: disable=import-outside-toplevel
  kernel = _splash_kernel(q_BxTxNxH.shape[1], q_BxTxNxH.shape[2], interpret)
  # The kernel does not scale the logits: scale the queries. It wants heads before the sequence.
  q_BxNxTxH = (q_BxTxNxH * jnp.asarray(scale, q_BxTxNxH.dtype)).transpose(0, 2, 1, 3)
  k_BxKxSxH, v_BxKxSxH = k_BxSxKxH.transpose(0, 2, 1, 3), v_BxSxKxH.transpose(0, 2, 1, 3)
  one_row = lambda q, k, v, seg: kernel(q, k, v, segment_ids=SegmentIds(q=seg, kv=seg))  # noqa: E731
  out_BxNxTxH = jax.vmap(one_row)(q_BxNxTxH, k_BxKxSxH, v_BxKxSxH, segment_ids_BxT)
  return out_BxNxTxH.transpose(0, 2, 1, 3)


def _splash(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, scale, interpret):
  spec, repeat = _head_spec(q_BxTxNxH, k_BxSxKxH.shape[2])
  local = functools.partial(_splash_local, scale=scale, interpret=interpret)
  if spec is None:
    return local(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT)
  if repeat:
    n = q_BxTxNxH.shape[2]
    k_BxSxKxH, v_BxSxKxH = _repeat_kv(k_BxSxKxH, n), _repeat_kv(v_BxSxKxH, n)
  seg_spec = P(spec[0], None)
  return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(), in_specs=(spec, spec, spec, seg_spec),
                       out_specs=spec, check_vma=False)(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT)
