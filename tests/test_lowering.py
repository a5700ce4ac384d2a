"""The KD train step lowered for an H200 and for a TPU, on this CPU: which attention kernels the program calls.

No GPU or TPU is needed to *lower* a program for one (`jit(f).trace(...).lower(lowering_platforms=...)`), only
to compile and run it. So these tests see, on every CI run, what the kernel tests of tests/test_attention.py
can only see on the hardware: that `attention="auto"` puts cuDNN's flash attention (GPU) or the splash kernel
(TPU) into the real step, that jax accepts our inputs to them (its shape and layout checks run while tracing),
that the teacher runs the forward-only kernel and is never differentiated, and that no [B, N, T, T] score
tensor is left anywhere. The kernels' numbers are checked on the hardware (scripts/gpu_check.sh runs
tests/test_attention.py there).
"""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxkd import checkpoint, on_policy, optim, sharding, signals, step as step_lib
from jaxkd.models import ModelConfig, Transformer
from jaxkd.models import attention as attn
from tests.steps import loss_config

T = 256  # splash needs a multiple of 128
STUDENT = dict(model_type="qwen2", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
               num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=T, qkv_bias=True,
               tie_embeddings=True)
TEACHER = {**STUDENT, "hidden_size": 128, "num_layers": 3, "head_dim": 32, "num_heads": 6, "tie_embeddings": False}
H200 = dict(cuda=True, cudnn=True, capability=(9, 0))


def _target(monkeypatch, backend: str):
  """Choose kernels as on an H200 ("gpu") or a TPU ("tpu") although this process runs on a CPU."""
  choose = attn.choose_implementation
  monkeypatch.setattr(attn, "implementation_for", lambda requested, **kw: choose(requested, backend=backend,
                                                                                   **H200, **kw))
  if backend == "gpu":  # jax asks the CUDA plugin for cuDNN's version while tracing; there is none here
    from jax._src.cudnn import fused_attention_stablehlo  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)


def _lowered_step(platform: str, *, attention="auto", mesh_shape=(1, 1, 1), rows=2, remat="none",
                  rollout=None) -> str:
  """StableHLO text of the KD train step (bf16 student and teacher, alpha 0.5) lowered for `platform`; with a
  `rollout` (jaxkd.on_policy.Rollout), of the on-policy step."""
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  with jax.set_mesh(mesh):
    modules = {name: nnx.eval_shape(lambda cfg=cfg, seed=seed, remat=remat: Transformer(
        ModelConfig(**cfg), dtype=jnp.bfloat16, attention=attention, remat=remat, rngs=nnx.Rngs(seed)))
               for name, cfg, seed, remat in (("student", STUDENT, 0, remat), ("teacher", TEACHER, 1, "none"))}
    (s_def, s_state), (t_def, t_state) = (nnx.split(modules[n]) for n in ("student", "teacher"))
    s_sh, t_sh = (sharding.module_shardings(mesh, modules[n]) for n in ("student", "teacher"))
    params, param_sh = {"student": nnx.to_pure_dict(s_state)}, {"student": s_sh}
    optimizer = optim.skip_nonfinite(optax.adamw(1e-3))
    opt_sh = sharding.opt_state_shardings(mesh, jax.eval_shape(optimizer.init, params), param_sh)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_sh = step_lib.TrainState(step=rep, params=param_sh, opt_state=opt_sh, rng=rollout and rep)
    lc = loss_config(alpha=0.5, vocab_size=STUDENT["vocab_size"], chunk_size=128)
    batch_sh = sharding.batch_shardings(mesh, lc.batch_keys())
    kw = dict(state_shardings=state_sh, teacher_shardings=t_sh, batch_shardings=batch_sh)
    if rollout is None:
      fn = step_lib.make_train_step(s_def, signals.online(t_def), optimizer, lambda s: 1e-3, lc, **kw)
    else:
      fn = step_lib.make_on_policy_step(s_def, signals.online(t_def), optimizer, lambda s: 1e-3, lc, rollout, **kw)
    state = checkpoint.abstract_like(step_lib.TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=jax.eval_shape(optimizer.init, params),
        rng=jax.eval_shape(lambda: on_policy.initial_key(0)) if rollout else None), state_sh)
    ints = jax.ShapeDtypeStruct((rows, T), jnp.int32)
    batch = {k: ints for k in lc.batch_keys()} | {"loss_mask": jax.ShapeDtypeStruct((rows, T), np.float32)}
    batch = checkpoint.abstract_like(batch, batch_sh)
    return fn.trace(state, checkpoint.abstract_like(nnx.to_pure_dict(t_state), t_sh),
                    batch).lower(lowering_platforms=(platform,)).as_text()


def _scores(text: str) -> list[str]:
  """Shapes in the program of per-head attention scores: [B, N, T, T], or [B, K, N / K, T, T] as the XLA path
  builds them for grouped heads. A [B, 1, T, T] mask or bias is not one."""
  shapes = re.findall(rf"tensor<((?:\d+x)+){T}x{T}x", text)
  return sorted({s for s in shapes if any(int(d) > 1 for d in s.split("x")[1:-1])})


def _cudnn_calls(text: str) -> list[tuple[str, str]]:
  """(target, result types) of every cuDNN attention call."""
  return [(m.group(1), m.group(2)) for m in
          re.finditer(r"custom_call @__cudnn\$(fmha\w+)\(.*->\s*\((.*)\)\s*$", text, re.MULTILINE)]


def test_step_lowered_for_an_h200_calls_cudnn_flash_attention(monkeypatch):
  _target(monkeypatch, "gpu")
  rows, s_h, t_h = 2, STUDENT["head_dim"], TEACHER["head_dim"]

  xla = _lowered_step("cuda", attention="xla")  # the control: what the score check below would catch
  assert not _cudnn_calls(xla)
  assert _scores(xla), "the XLA path builds [B, N, T, T] scores: the check below would see them"

  text = _lowered_step("cuda")
  calls = _cudnn_calls(text)
  # The layers are scanned, so one call per model and direction: the student's forward, which keeps the
  # softmax statistics for its backward; the teacher's forward, which keeps nothing (it is never
  # differentiated); and the student's backward. Told apart by their head dims.
  forward = sorted(r for name, r in calls if name == "fmhaScaleBiasSoftmax")
  backward = [r for name, r in calls if name == "fmhaScaleBiasSoftmaxBackward"]
  assert len(calls) == 3 and len(forward) == 2 and len(backward) == 1, calls
  student_fwd, = (r for r in forward if f"x{s_h}xbf16>" in r.split(",")[0])
  teacher_fwd, = (r for r in forward if f"x{t_h}xbf16>" in r.split(",")[0])
  assert f"tensor<{rows}x{STUDENT['num_heads']}x{T}xf32>" in student_fwd  # log-sum-exp kept for the backward
  assert "f32" not in teacher_fwd, teacher_fwd
  assert f"x{s_h}xbf16>" in backward[0] and f"x{t_h}xbf16>" not in backward[0], backward
  configs = re.findall(r'custom_call @__cudnn\$fmha\w+\(.*backend_config = "(.*?)", operand_layouts', text)
  assert len(configs) == 3
  for config in configs:  # flash attention with cuDNN's causal mask; documents via the [B, 1, T, T] bias
    assert r"\22is_flash_attention\22: true" in config and r"\22mask_type\22: \22CAUSAL\22" in config, config
  assert not _scores(text), _scores(text)


def test_step_lowered_for_a_tpu_calls_splash_per_shard(monkeypatch):
  """On a (data 2, fsdp 2, tensor 2) mesh: the kernels run inside shard_map, on each device's rows and heads."""
  _target(monkeypatch, "tpu")
  rows = 4
  text = _lowered_step("tpu", mesh_shape=(2, 2, 2), rows=rows)
  kernels = collections.Counter(re.findall(r'kernel_name = "(splash_mha_\w+)"', text))
  # Student forward (keeping residuals for its backward), teacher forward (keeping none), and the student's
  # two backward kernels; each once, inside the layer scan.
  assert kernels == {"splash_mha_fwd_segmented_residuals": 1, "splash_mha_fwd_segmented_no_residuals": 1,
                     "splash_mha_dq_segmented_no_residuals": 1, "splash_mha_dkv_segmented_no_residuals": 1}, kernels
  calls = [line for line in text.splitlines() if "stablehlo.custom_call @tpu_custom_call" in line]
  assert len(calls) == 4 and "sdy.manual_computation" in text  # inside shard_map
  # Each device's kernel sees its share of the query heads (the tensor axis splits them in two): 2 of the
  # student's 4, 3 of the teacher's 6, with their one key/value head.
  s, t = STUDENT, TEACHER
  assert sum(f"tensor<{s['num_heads'] // 2}x{T}x{s['head_dim']}xbf16>" in c for c in calls) == 3
  assert sum(f"tensor<{t['num_heads'] // 2}x{T}x{t['head_dim']}xbf16>" in c for c in calls) == 1
  assert not _scores(text), _scores(text)


def test_on_policy_step_lowered_for_a_tpu_prefills_through_splash(monkeypatch):
  """The on-policy step: the sampler's prefill of the 128-token prompts runs the splash kernel forward only (the
  one-token decode steps attend to the cache without it); then the train step's kernels, the teacher's forward-only
  on the sampled rows. No [B, N, T, T] scores anywhere."""
  _target(monkeypatch, "tpu")
  rollout = on_policy.Rollout(max_new_tokens=T // 2, prompt_len=T // 2, prompts_per_row=1, temperature=0.9,
                              top_p=None, top_k=None, eos_ids=(1,), vocab_size=STUDENT["vocab_size"], seq_kd=False)
  text = _lowered_step("tpu", rollout=rollout)
  kernels = collections.Counter(re.findall(r'kernel_name = "(splash_mha_\w+)"', text))
  assert kernels == {"splash_mha_fwd_segmented_residuals": 1, "splash_mha_fwd_segmented_no_residuals": 2,
                     "splash_mha_dq_segmented_no_residuals": 1, "splash_mha_dkv_segmented_no_residuals": 1}, kernels
  calls = [line for line in text.splitlines() if "stablehlo.custom_call @tpu_custom_call" in line]
  s, t = STUDENT, TEACHER
  prefill = [c for c in calls if f"x{s['num_heads']}x{T // 2}x{s['head_dim']}xbf16>" in c]
  assert len(prefill) == 1, calls  # the student's, over the prompt's 128 tokens
  assert sum(f"x{t['num_heads']}x{T}x{t['head_dim']}xbf16>" in c for c in calls) == 1  # the teacher, forward
  assert not _scores(text), _scores(text)


@pytest.mark.parametrize("backend,platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_float32_compute_falls_back_to_xla(monkeypatch, backend, platform):
  """cuDNN takes bf16/fp16 only; a float32 model on a GPU lowers to the XLA path (splash takes float32)."""
  _target(monkeypatch, backend)
  s = nnx.eval_shape(lambda: Transformer(ModelConfig(**STUDENT), dtype=jnp.float32, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(s)
  ids = jax.ShapeDtypeStruct((2, T), jnp.int32)  # token ids, document ids and positions alike
  forward = lambda st, tokens, docs, pos: nnx.merge(graphdef, st)(tokens, segment_ids=docs, positions=pos)  # noqa: E731
  text = jax.jit(forward).trace(state, ids, ids, ids).lower(lowering_platforms=(platform,)).as_text()
  fused = bool(_cudnn_calls(text)) or "tpu_custom_call" in text
  assert fused == (backend == "tpu")


@pytest.mark.parametrize("backend,platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_remat_policy_that_keeps_the_fused_attention_output(monkeypatch, backend, platform):
  """Under `dots_no_batch` the fused kernel is no dot, so its output is not saved and the backward pass runs
  the student's attention forward again; `dots_no_batch_attention` saves it (and its softmax statistics)."""
  _target(monkeypatch, backend)

  def student_forwards(remat):
    text = _lowered_step(platform, remat=remat)
    if backend == "gpu":
      return sum(name == "fmhaScaleBiasSoftmax" and "f32" in r for name, r in _cudnn_calls(text))
    return len(re.findall(r'kernel_name = "splash_mha_fwd_segmented_residuals"', text))

  assert student_forwards("dots_no_batch") == 2
  assert student_forwards("dots_no_batch_attention") == 1
