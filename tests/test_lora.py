"""LoRA students: the adapted projection against float64 NumPy, dropout, sharding, a step that trains the adapters
alone (its gradient from the full model's by the chain rule; with micro-batches and dropout, the sum of their
objectives; its optimizer state and compiled memory), the on-policy step (sampling with the adapters, the same chain
rule), and a run: resumed bitwise, exported merged (transformers' forward) and as a PEFT folder (peft's forward on the
base model)."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers as tf
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxkd import config_base, on_policy, optim, program, sharding, signals, tiny, trainer
from jaxkd import step as step_lib
from jaxkd.models import Transformer, lora
from jaxkd.models.layers import Linear
from tests import runs
from tests.steps import STUDENT, TEACHER, V, loss_config, optimizer_config, packed_batch
from tests.test_on_policy import N as NEW_TOKENS, P as PROMPT_LEN, packed as prompt_batch

ALL = tuple(lora.TARGETS)


def _set(var, value):
  var.set_value(jnp.asarray(value, var.get_value().dtype))


def test_adapted_projection_equals_float64_numpy_and_starts_as_the_base():
  cfg = lora.LoraConfig(rank=3, alpha=5.0, dropout=0.0, targets=ALL)
  lin = Linear(16, 10, axes=("embed", "mlp"), bias=True, lora=cfg, rngs=nnx.Rngs(0))
  plain = Linear(16, 10, axes=("embed", "mlp"), bias=True, rngs=nnx.Rngs(0))
  x = np.random.RandomState(0).randn(2, 4, 16).astype(np.float32)
  # PEFT's start: B zero, A ~ U(-1/sqrt(in), 1/sqrt(in)); the adapted layer computes the base layer's output exactly.
  a = np.asarray(lin.lora_a[...])
  assert a.shape == (16, 3) and np.all(np.asarray(lin.lora_b[...]) == 0)
  assert np.abs(a).max() <= 0.25 and np.abs(a).max() > 0.2  # bound 1/sqrt(16)
  _set(plain.kernel, lin.kernel[...])
  _set(plain.bias, 0.3 * np.arange(10))
  _set(lin.bias, 0.3 * np.arange(10))
  np.testing.assert_array_equal(np.asarray(lin(x)), np.asarray(plain(x)))
  b = np.random.RandomState(1).randn(3, 10).astype(np.float32)
  _set(lin.lora_b, b)
  w, bias = np.asarray(lin.kernel[...], np.float64), np.asarray(lin.bias[...], np.float64)
  x64 = x.astype(np.float64)
  want = x64 @ w + bias + (5.0 / 3) * (x64 @ a.astype(np.float64)) @ b.astype(np.float64)
  np.testing.assert_allclose(np.asarray(lin(x)), want, rtol=1e-5, atol=1e-5)
  assert np.abs(want - (x64 @ w + bias)).max() > 0.1  # the adapter's part is not negligible


def test_dropout_drops_the_adapters_input_while_training_only():
  """With A = B = I and no kernel, the layer's output is the adapter's dropped input: each element 0 or x / (1 - p),
  about p of them 0; without a key (evaluation, sampling) nothing is dropped."""
  p, d = 0.25, 8
  lin = Linear(d, d, axes=("embed", "mlp"), bias=False, lora=lora.LoraConfig(d, float(d), p, ALL),
               rngs=nnx.Rngs(0))
  _set(lin.kernel, np.zeros((d, d)))
  _set(lin.lora_a, np.eye(d))
  _set(lin.lora_b, np.eye(d))
  x = np.random.RandomState(0).uniform(1.0, 2.0, (64, 64, d)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(lin(x)), x, rtol=1e-6)
  y = np.asarray(lin(x, jax.random.key(0)))
  dropped = y == 0
  np.testing.assert_allclose(y[~dropped], x[~dropped] / (1 - p), rtol=1e-6)
  assert abs(dropped.mean() - p) < 0.01, dropped.mean()
  other = np.asarray(lin(x, jax.random.key(1))) == 0
  assert (other != dropped).mean() > 0.2  # another key, another mask


def test_adapters_are_sharded_like_their_kernels_never_over_the_rank():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  model = nnx.eval_shape(lambda: Transformer(STUDENT, lora=lora.LoraConfig(4, 8.0, 0.0, ALL), rngs=nnx.Rngs(0)))
  base = sharding.module_shardings(mesh, model, lora.BASE)
  adapters = sharding.module_shardings(mesh, model, lora.ADAPTERS)
  for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                      ("mlp", ("gate_proj", "up_proj", "down_proj"))):
    for name in names:
      layers, d_in, d_out = base["layers"][part][name]["kernel"].spec
      assert adapters["layers"][part][name]["lora_a"].spec == P(layers, d_in, None), name
      assert adapters["layers"][part][name]["lora_b"].spec == P(layers, None, d_out), name
      assert {d_in, d_out} == {"fsdp", "tensor"}, (name, d_in, d_out)  # the check above compares something


@pytest.mark.parametrize("bad,match", [
    ({"student.lora.rank": -1}, r"config\.student\.lora\.rank=-1: must be an integer >= 0"),
    ({"student.lora.rank": 8, "student.lora.alpha": 0.0}, r"config\.student\.lora\.alpha=0\.0: must be > 0"),
    ({"student.lora.rank": 8, "student.lora.dropout": 1.0},
     r"config\.student\.lora\.dropout=1\.0: must be in \[0, 1\)"),
    ({"student.lora.rank": 8, "student.lora.targets": "q,proj"},
     r"config\.student\.lora\.targets='q,proj': \['proj'\] unknown; use a comma-separated subset of "
     r"q,k,v,o,gate,up,down"),
    ({"student.lora.rank": 8, "student.lora.targets": "q,q"}, r"targets='q,q': a target is named twice"),
    ({"student.lora.rank": 8, "student.lora.targets": " , "}, r"targets=' , ': empty"),
    ({"export.lora_adapter": True}, r"config\.export\.lora_adapter=True: .* student\.lora\.rank is 0"),
])
def test_bad_lora_settings_are_refused_at_start_naming_the_key(bad, match):
  with pytest.raises(config_base.ConfigError, match=match):
    config_base.validate(runs.load_config(**bad))


# ----------------------------------------------------------------------------------------------------
# The step.

LORA = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=ALL)
LC = loss_config(alpha=0.5, temperature=2.0, vocab_size=V, chunk_size=48)
CACHED_LC = dataclasses.replace(LC, cached=True)
TOP_K = 8  # a cached teacher's stored log-probs per token


def _lora_student(cfg=LORA):
  """A LoRA student whose B is random (at B = 0 the gradient of A vanishes)."""
  student = Transformer(STUDENT, lora=cfg, rngs=nnx.Rngs(0))
  rng = np.random.RandomState(3)
  for _, var in nnx.to_flat_state(nnx.state(student, lora.ADAPTERS)):
    if var.get_value().ndim and var.get_metadata()["axes"][-2] == "lora_rank":
      _set(var, 0.3 * rng.randn(*var.get_value().shape))
  return student


def _teacher(cached, t_def):
  """(the step's teacher source, its loss settings): the teacher model, or its top-k read with the batch."""
  return (signals.CachedTeacher(), CACHED_LC) if cached else (signals.online(t_def), LC)


def _step(cfg=LORA, lora_seed=0, cached=False):
  """The LoRA step; `cached`: its teacher is the stored top-k read with the batch (`with_top_k`), not a model."""
  student = _lora_student(cfg)
  teacher = Transformer(TEACHER, rngs=nnx.Rngs(1))
  optimizer, lr = optim.make_optimizer(optimizer_config(), 3)
  s_def = nnx.split(student)[0]
  t_def, t_params = nnx.split(teacher)[0], nnx.to_pure_dict(nnx.state(teacher))
  params = {"student": nnx.to_pure_dict(nnx.state(student, lora.ADAPTERS))}
  base = nnx.to_pure_dict(nnx.state(student, lora.BASE))
  state = step_lib.TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params))
  source, lc = _teacher(cached, t_def)
  fn = step_lib.make_train_step(s_def, source, optimizer, lr, lc, lora_seed=lora_seed)
  return fn, state, step_lib.frozen_input(None if cached else t_params, base), student, (t_def, t_params)


TARGETS = [(part, name) for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                            ("mlp", ("gate_proj", "up_proj", "down_proj"))) for name in names]


def _merged(student, adapters):
  """(graphdef, parameters) of the plain model whose kernels are the LoRA student's merged W + s A B."""
  p_params = nnx.to_pure_dict(nnx.state(student, lora.BASE))
  for part, name in TARGETS:
    ad, k = adapters["layers"][part][name], p_params["layers"][part][name]
    k["kernel"] = lora.merged_kernel(k["kernel"], ad["lora_a"], ad["lora_b"], LORA.scale)
  return nnx.split(Transformer(STUDENT, rngs=nnx.Rngs(0)))[0], p_params


def _chain_rule(adapters, g):
  """{(part, name): (dL/dA, dL/dB)} = (s dL/dW B^T, s A^T dL/dW) from the merged model's gradient (or step) g."""
  out = {}
  for part, name in TARGETS:
    ad, dw = adapters["layers"][part][name], g["layers"][part][name]["kernel"]
    out[part, name] = (LORA.scale * jnp.einsum("lio,lro->lir", dw, ad["lora_b"]),
                       LORA.scale * jnp.einsum("lir,lio->lro", ad["lora_a"], dw))
  return out


def with_top_k(batch, t_def, t_params):
  """`batch` with the teacher's top-k at each token, as `python -m jaxkd.capture` stores and a run reads them."""
  idx, lp = signals.top_k_fn(t_def, TOP_K, V, LC.chunk_size)(t_params, batch)
  return {**batch, "teacher_indices": idx, "teacher_logprobs": lp}


@pytest.mark.parametrize("cached", [False, True], ids=["online_teacher", "cached_teacher"])
def test_the_step_trains_the_adapters_alone_with_the_chain_rules_gradient(cached):
  """The step's gradient norm is that of dL/dA = s dL/dW B^T and dL/dB = s A^T dL/dW, from the gradient of the
  same loss in the model without adapters whose kernels are the merged W + s A B; the base weights, an input
  beside the teacher's, come out bitwise as they went in (and alive: not donated); the optimizer holds moments
  for the adapters alone. With the teacher model, and with its top-k read from a cache."""
  fn, state, frozen, student, (t_def, t_params) = _step(cached=cached)
  batch = packed_batch(0)
  if cached:
    batch = with_top_k(batch, t_def, t_params)
  base_before = jax.device_get(frozen["student"])
  adapters = jax.device_get(state.params["student"])  # (the step donates them)
  new_state, metrics = fn(state, frozen, batch)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen["student"]), base_before)
  moments = [s for s in jax.tree.leaves(new_state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
  assert len(moments) == 1
  for m in (moments[0].mu, moments[0].nu):
    assert jax.tree.structure(m) == jax.tree.structure({"student": adapters})
    assert jax.tree.map(jnp.shape, m) == jax.tree.map(jnp.shape, {"student": adapters})

  # The reference: the plain model with merged kernels, differentiated with respect to its kernels.
  p_def, p_params = _merged(student, adapters)
  source, lc = _teacher(cached, t_def)
  signal = source(None if cached else t_params, batch, lc)

  def loss(p):
    n_tokens, n_hidden = step_lib.batch_counts(batch, lc)
    return step_lib.objective(nnx.merge(p_def, p), None, signal, batch, lc, n_tokens, n_hidden)[0]

  g = jax.grad(loss)(p_params)
  sq = sum(float(jnp.sum(d ** 2)) for d in jax.tree.leaves(_chain_rule(adapters, g)))
  np.testing.assert_allclose(float(metrics["grad_norm"]), np.sqrt(sq), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["loss"]), float(loss(p_params)), rtol=1e-5)
  assert float(metrics["kd"]) > 1e-3  # the teacher's term is in the loss, from either source


def test_the_on_policy_step_samples_with_the_adapters_and_trains_them_by_the_chain_rule():
  """On-policy steps with a LoRA student: it writes its completions with its adapters (greedy: the same tokens and
  loss as the plain model whose kernels are the merged W + s A B), and under SGD(1) the adapters move by the chain
  rule of the merged model's move: A - A' = s (W - W') B^T, B - B' = s A^T (W - W'); the base weights come out as
  they went in."""
  student, teacher = _lora_student(), Transformer(TEACHER, rngs=nnx.Rngs(1))
  t_def, t_params = nnx.split(teacher)[0], nnx.to_pure_dict(nnx.state(teacher))
  lc = loss_config(alpha=0.5, temperature=2.0, vocab_size=V, chunk_size=16)
  rollout = on_policy.Rollout(max_new_tokens=NEW_TOKENS, prompt_len=PROMPT_LEN, prompts_per_row=2, temperature=0.0,
                              top_p=None, top_k=None, eos_ids=(), vocab_size=V, seq_kd=False)
  sgd = optim.skip_nonfinite(optax.sgd(1.0))
  batch = jax.tree.map(jnp.asarray, prompt_batch())

  def step(s_def, params, frozen, lora_seed):
    fn = step_lib.make_on_policy_step(s_def, signals.online(t_def), sgd, optax.constant_schedule(1.0), lc, rollout,
                                      lora_seed=lora_seed)
    params = {"student": jax.tree.map(jnp.copy, params)}  # the step donates its state
    state = step_lib.TrainState(step=jnp.int32(0), params=params, opt_state=sgd.init(params),
                                rng=on_policy.initial_key(0))
    new, metrics = fn(state, frozen, batch)
    return jax.device_get(new.params["student"]), metrics

  adapters = jax.device_get(nnx.to_pure_dict(nnx.state(student, lora.ADAPTERS)))
  base = nnx.to_pure_dict(nnx.state(student, lora.BASE))
  base_before = jax.device_get(base)
  frozen = step_lib.frozen_input(t_params, base)
  new, metrics = step(nnx.split(student)[0], adapters, frozen, lora_seed=0)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen["student"]), base_before)
  p_def, p_params = _merged(student, adapters)
  p_new, p_metrics = step(p_def, p_params, t_params, lora_seed=None)

  assert float(metrics["tokens"]) == float(p_metrics["tokens"]) > 0
  np.testing.assert_allclose(float(metrics["loss"]), float(p_metrics["loss"]), rtol=1e-5)
  moved = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), p_params, p_new)
  for (part, name), (da, db) in _chain_rule(adapters, moved).items():
    for key, want in (("lora_a", da), ("lora_b", db)):
      got = np.asarray(adapters["layers"][part][name][key], np.float64) - new["layers"][part][name][key]
      assert np.abs(want).max() > 0, (part, name, key)
      np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max(), err_msg=f"{part} {name} {key}")


def test_adapter_dropout_acts_in_the_train_step_alone_and_its_key_follows_the_step():
  cfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.5, targets=ALL)
  fn, state, frozen, student, (t_def, _) = _step(cfg)
  fn0, _, _, _, _ = _step(LORA)
  batch = packed_batch(0)
  copy = lambda s: jax.tree.map(jnp.copy, s)  # the steps donate their state
  loss = lambda f, s: float(f(copy(s), frozen, batch)[1]["loss"])
  dropped, again, kept = loss(fn, state), loss(fn, state), loss(fn0, state)
  later = loss(fn, state.replace(step=jnp.int32(1)))
  assert dropped == again and dropped != kept and later not in (dropped, kept)
  evaluate = step_lib.make_eval_step(nnx.split(student)[0], signals.online(t_def), LC, lora_seed=0)
  ce = [float(evaluate(state.params, frozen, batch)["ce_sum"]) for _ in range(2)]
  plain = step_lib.make_eval_step(nnx.split(_lora_student(LORA))[0], signals.online(t_def), LC, lora_seed=0)
  assert ce[0] == ce[1] == float(plain(state.params, frozen, batch)["ce_sum"])


def test_micro_batches_draw_their_own_adapter_dropout_and_add_up_to_the_steps_gradient():
  """With optimizer.micro_batches = 2 and adapter dropout, micro-batch i (rows i, i + 2, ...) draws its masks from
  fold_in(the step's key, i): the step's loss and gradient norm are those of the sum of the two micro-batches'
  objectives, each under its own key, from the model's own forward; one key for both gives another gradient."""
  cfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.5, targets=ALL)
  lc = dataclasses.replace(LC, micro_batches=2)
  student, teacher = _lora_student(cfg), Transformer(TEACHER, rngs=nnx.Rngs(1))
  s_def, t_def = nnx.split(student)[0], nnx.split(teacher)[0]
  t_params = nnx.to_pure_dict(nnx.state(teacher))
  adapters = nnx.to_pure_dict(nnx.state(student, lora.ADAPTERS))
  base = nnx.to_pure_dict(nnx.state(student, lora.BASE))
  optimizer, lr = optim.make_optimizer(optimizer_config(), 3)
  params = {"student": jax.tree.map(jnp.copy, adapters)}  # the step donates its state
  state = step_lib.TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params))
  batch = jax.tree.map(jnp.asarray, packed_batch(0))
  fn = step_lib.make_train_step(s_def, signals.online(t_def), optimizer, lr, lc, lora_seed=0)
  _, metrics = fn(state, step_lib.frozen_input(t_params, base), batch)

  n_tokens, n_hidden = step_lib.batch_counts(batch, lc)
  key = step_lib.dropout_key(0, 0)

  def loss(a, micro, k):
    model = nnx.merge(s_def, base, a)
    signal = signals.online(t_def)(t_params, micro, lc)
    return step_lib.objective(model, None, signal, micro, lc, n_tokens, n_hidden, dropout_key=k)[0]

  def summed(keys):
    parts = [jax.value_and_grad(loss)(adapters, jax.tree.map(lambda x, i=i: x[i::2], batch), k)
             for i, k in enumerate(keys)]
    grads = jax.tree.map(jnp.add, parts[0][1], parts[1][1])
    return parts[0][0] + parts[1][0], float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))))

  want_loss, want_norm = summed([jax.random.fold_in(key, i) for i in range(2)])
  np.testing.assert_allclose(float(metrics["loss"]), float(want_loss), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["grad_norm"]), want_norm, rtol=1e-4)
  _, one_key_norm = summed([jax.random.fold_in(key, 0)] * 2)
  assert abs(one_key_norm - want_norm) > 1e-3 * want_norm


def _device_bytes(tree, shardings) -> int:
  """Bytes of `tree`'s arrays on one device under `shardings` (what memory_analysis counts)."""
  sizes = jax.tree.map(lambda x, s: np.prod(s.shard_shape(x.shape)) * x.dtype.itemsize, tree, shardings)
  return int(sum(jax.tree.leaves(sizes)))


def test_the_compiled_step_holds_no_moments_for_the_frozen_weights(tmp_path):
  """From the run's own program (tiny_logit, 8 devices): per device, the LoRA step's arguments are the full step's
  less two float32 moments of every base weight, plus the adapters with their two moments; it donates and
  writes back (aliases) only the adapters, their moments and the counters."""
  full = program.abstract_program(runs.load_config(workdir=str(tmp_path / "a")))
  low = program.abstract_program(runs.load_config(workdir=str(tmp_path / "b"), **{"student.lora.rank": 8}))
  base = _device_bytes(full.params["student"], full.state_shardings.params["student"])
  adapters = _device_bytes(low.params["student"], low.state_shardings.params["student"])
  assert _device_bytes(low.student_base, low.student_base_shardings) == base
  memory = {}
  for name, prog in (("full", full), ("lora", low)):
    with jax.set_mesh(prog.mesh):
      memory[name] = prog.train_step.lower(*prog.abstract_inputs()).compile().memory_analysis()
  f, lo = memory["full"], memory["lora"]
  assert f.argument_size_in_bytes - lo.argument_size_in_bytes == 2 * base - 3 * adapters
  assert f.alias_size_in_bytes - lo.alias_size_in_bytes == 3 * (base - adapters)


# ----------------------------------------------------------------------------------------------------
# A run.

RUN = {"steps": 6, "checkpoint_every": 3, "data.eval_fraction": 0.0, "export.dtype": "float32", "progress": False,
       "samples.count": 0, "student.lora.rank": 4, "student.lora.dropout": 0.1, "export.lora_adapter": True}


def _bytes(path):
  with open(path, "rb") as f:
    return f.read()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """(workdir, Run after training, train metric rows, export bytes, adapter bytes) of a LoRA run of tiny_logit."""
  workdir = str(tmp_path_factory.mktemp("lora") / "run")
  run = trainer.Run(runs.load_config(workdir=workdir, **RUN))
  run.train()
  return (workdir, run, runs.train_rows(workdir), runs.export_bytes(workdir),
          _bytes(os.path.join(workdir, "export_adapter", "adapter_model.safetensors")))


def test_a_lora_run_checkpoints_the_adapters_alone_and_resumes_bitwise(lora_run):
  workdir, _, rows, export, adapter = lora_run
  meta = json.load(open(os.path.join(workdir, "checkpoints", "6", "meta", "metadata")))
  params = [k for k in meta["checksums"] if k.startswith("['params']")]
  assert params and all(k.endswith(("['lora_a']", "['lora_b']")) for k in params), params
  assert len(params) == 2 * len(ALL)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))  # the rerun resumes from step 3 and redoes 4..6
  trainer.run(runs.load_config(workdir=workdir, **RUN))
  runs.assert_same_rows(runs.train_rows(workdir), rows)
  assert runs.export_bytes(workdir) == export
  assert _bytes(os.path.join(workdir, "export_adapter", "adapter_model.safetensors")) == adapter


def test_the_abstract_program_of_a_lora_run_is_the_runs(lora_run, monkeypatch):
  """What the ahead-of-time compiles take (no weight read): the same trained parameters and frozen inputs, with
  the same shapes, dtypes and shardings, as the run that trained."""
  workdir, run, _, _, _ = lora_run
  monkeypatch.setattr(trainer.models, "from_pretrained", lambda *a, **k: pytest.fail("a weight file was read"))
  prog = program.abstract_program(runs.load_config(workdir=workdir, **RUN))
  spec = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), tree)
  state, frozen, _ = prog.abstract_inputs()
  assert spec(state.params) == spec(run.final_params)
  assert spec(frozen) == spec(run.program.frozen) and set(frozen) == {"teacher", "student"}


def test_a_lora_run_exports_merged_weights_and_a_peft_adapter_with_the_trained_logits(lora_run):
  peft = pytest.importorskip("peft")
  workdir, run, _, _, _ = lora_run
  ids = np.random.RandomState(0).randint(0, 700, (2, 20)).astype(np.int32)
  ours = np.asarray(run.program.student(run.final_params)(ids))
  base_folder = tiny.resolve("tiny:student")
  with torch.no_grad():
    base = tf.AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()
    untrained = base(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - untrained).max() > 1e-2  # the adapters have learned something to export
    merged = tf.AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "export"), dtype=torch.float32).eval()
    np.testing.assert_allclose(merged(torch.tensor(ids)).logits.numpy(), ours, atol=1e-4)
    adapted = peft.PeftModel.from_pretrained(base, os.path.join(workdir, "export_adapter")).eval()
    np.testing.assert_allclose(adapted(torch.tensor(ids)).logits.numpy(), ours, atol=1e-4)
  config = json.load(open(os.path.join(workdir, "export_adapter", "adapter_config.json")))
  assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 16.0, base_folder)


@pytest.mark.parametrize("remat", ["dots_no_batch", "dots_no_batch_attention"])
def test_rematerialised_layers_keep_no_more_for_adapters_than_for_full_training(remat):
  """Under the policies that save dots, an adapted projection's output (its dot plus the adapter's) is saved as the
  dot it extends would be; were it rebuilt from both dots in the backward pass, both would be saved and the
  activations kept would grow by half. The gradient of the adapters alone needs no more
  temporary memory than the full model's but for the adapters' own inputs of B, x @ A, which B's gradient needs."""
  b, t = 8, 512
  ids = jnp.asarray(np.random.RandomState(0).randint(0, V, (b, t)), jnp.int32)

  def temporaries(cfg):
    model = Transformer(STUDENT, remat=remat, lora=cfg, rngs=nnx.Rngs(0))
    graphdef, trained, rest = nnx.split(model, lora.ADAPTERS if cfg else nnx.Param, ...)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest).forward(ids, compute_logits=False).last_hidden ** 2)
    return jax.jit(jax.grad(loss)).lower(trained).compile().memory_analysis().temp_size_in_bytes

  full, adapted = temporaries(None), temporaries(LORA)
  x_a = len(ALL) * STUDENT.num_layers * b * t * LORA.rank * 4  # float32
  assert adapted - full < 2 * x_a, (adapted, full, x_a)  # 1.006 x_a; rebuilt from both dots, 9 x_a
