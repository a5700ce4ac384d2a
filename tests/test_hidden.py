"""Hidden-state distillation: loss vs NumPy, layer map, the projection trains, the export leaves it out,
cross-architecture and cross-tokenizer runs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx

from jaxkd import hidden, optim, signals, step as step_lib, trainer
from jaxkd.models import ModelConfig, Transformer
from tests.runs import load_config
from tests.steps import loss_config, optimizer_config, packed_batch


def _np_loss(s, t, mask, loss, layer_norm):
  s, t = s.astype(np.float64), t.astype(np.float64)
  if layer_norm:
    s = (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-6)
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6)
  if loss == "mse":
    d = ((s - t) ** 2).mean(-1)
  else:
    d = 1 - (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
  return (d * (mask > 0)[None]).sum()


@pytest.mark.parametrize("loss", ["mse", "cosine"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_hidden_loss_matches_numpy(loss, layer_norm):
  rng = np.random.RandomState(0)
  s, t = rng.randn(3, 11, 8).astype(np.float32), 2 * rng.randn(3, 11, 8).astype(np.float32) + 0.5
  mask = (rng.rand(11) < 0.6).astype(np.float32)
  ours = hidden.hidden_loss_sum(s, t, mask, loss=loss, layer_norm=layer_norm)
  np.testing.assert_allclose(float(ours), _np_loss(s, t, mask, loss, layer_norm), rtol=1e-5)


def test_layer_map_default_and_validation():
  assert hidden.layer_map(2, 4) == ((1, 2), (2, 4))
  assert hidden.layer_map(24, 32)[-1] == (24, 32) and len(hidden.layer_map(24, 32)) == 24
  assert hidden.layer_map(3, 3, [[0, 0], [3, 3]]) == ((0, 0), (3, 3))
  with pytest.raises(ValueError, match=r"student index 5 is outside 0\.\.4"):
    hidden.layer_map(4, 8, [[5, 8]])
  with pytest.raises(ValueError, match=r"teacher index 9 is outside 0\.\.8"):
    hidden.layer_map(4, 8, [[4, 9]])
  with pytest.raises(ValueError, match=r"must be a \[student, teacher\] pair"):
    hidden.layer_map(4, 8, [[1, 2, 3]])


def test_projection_receives_gradients_and_changes():
  s_cfg = ModelConfig(model_type="stablelm", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=4, head_dim=8, max_position_embeddings=64, norm="layer",
                      norm_bias=True)
  t_cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=48, intermediate_size=96, num_layers=4,
                      num_heads=4, num_kv_heads=2, head_dim=12, max_position_embeddings=64)
  pairs = hidden.layer_map(2, 4)
  lc = loss_config(alpha=0.0, kind="hidden", hidden_weight=1.0, layer_pairs=pairs, fused=False,
                           vocab_size=61)
  student, teacher = Transformer(s_cfg, rngs=nnx.Rngs(0)), Transformer(t_cfg, rngs=nnx.Rngs(1))
  projector = hidden.Projector(len(pairs), 32, 48, rngs=nnx.Rngs(2))
  params = {"student": nnx.to_pure_dict(nnx.state(student)), "projector": nnx.to_pure_dict(nnx.state(projector))}
  t_params = nnx.to_pure_dict(nnx.state(teacher))
  optimizer, lr = optim.make_optimizer(optimizer_config(warmup_steps=0), 4)
  fn = step_lib.make_train_step(nnx.split(student)[0], signals.OnlineTeacher(nnx.split(teacher)[0]), optimizer,
                                lr, lc, projector_def=nnx.split(projector)[0])
  state = step_lib.TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params))
  before = jax.tree.map(np.array, params["projector"])
  losses = []
  for i in range(4):
    state, m = fn(state, t_params, packed_batch(0))
    losses.append(float(m["hidden"]))
  after = state.params["projector"]
  changed = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), after, before)
  assert all(v > 0 for v in jax.tree.leaves(changed)), changed
  assert losses[-1] < losses[0]
  # The gradient reaches the projection: its norm is part of the step's gradient.
  batch = jax.tree.map(jnp.asarray, packed_batch(1))
  signal = signals.OnlineTeacher(nnx.split(teacher)[0])(t_params, batch, lc)
  grads = jax.grad(lambda p: step_lib.objective(
      nnx.merge(nnx.split(student)[0], p["student"]), nnx.merge(nnx.split(projector)[0], p["projector"]),
      signal, batch, lc, 1.0, 1.0)[0])(state.params)
  assert float(jnp.abs(grads["projector"]["proj"]["kernel"]).max()) > 0


def test_tiny_cross_architecture_run(tmp_path):
  """Llama teacher -> StableLM student of another width: the hidden loss falls; the export has no
  projection, loads in transformers, and gives the trained student's logits."""
  workdir = str(tmp_path / "run")
  cfg = load_config("tiny_hidden", **{"workdir": workdir, "steps": 16, "checkpoint_every": 8,
                                      "export.dtype": "float32"})
  run = trainer.Run(cfg)
  assert run.projector is not None and run.loss_cfg.layer_pairs == ((1, 2), (2, 4))
  run.train()
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    hist = [json.loads(line) for line in f if '"hidden"' in line]
  assert np.mean([m["hidden"] for m in hist[-3:]]) < 0.7 * np.mean([m["hidden"] for m in hist[:3]])
  export = os.path.join(workdir, "export")
  with open(os.path.join(export, "config.json")) as f:
    assert json.load(f)["model_type"] == "stablelm"
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(os.path.join(export, "model.safetensors"), "np") as f:
    names = list(f.keys())
  ref_model, info = tf.AutoModelForCausalLM.from_pretrained(export, output_loading_info=True, dtype=torch.float32)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  # exactly a plain student's tensors: nothing of the 64 -> 96 projection
  assert sorted(names) == sorted(ref_model.state_dict())
  assert not any(96 in f.get_slice(n).get_shape() for n in names for f in [safe_open(
      os.path.join(export, "model.safetensors"), "np")])
  trained = nnx.merge(run.program.student_def, run.final_params["student"])
  ids = np.random.RandomState(0).randint(0, 700, (1, 16)).astype(np.int32)
  with torch.no_grad():
    ref = ref_model.eval()(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(trained(ids)), ref, atol=1e-4)


def _train_history(workdir, key):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [m[key] for m in map(json.loads, f) if key in m and "eval_loss" not in m]


def test_tiny_cross_tokenizer_run(tmp_path):
  """A teacher on another tokenizer: logit KD is refused; hidden-state KD trains at aligned positions only."""
  from jaxkd import config_base, data  # pylint: disable=import-outside-toplevel
  with pytest.raises(config_base.ConfigError, match=r"differs from the student's.*distill.kind=\"hidden\""):
    trainer.Run(load_config("tiny_cross_tokenizer", **{"workdir": str(tmp_path / "logit"), "distill.kind":
                                                       "forward_kl", "distill.alpha": 0.5}))
  workdir = str(tmp_path / "run")
  run = trainer.Run(load_config("tiny_cross_tokenizer", **{"workdir": workdir, "steps": 16, "checkpoint_every": 8}))
  assert run.loss_cfg.cross_tokenizer and run.teacher_tokenizer is not None
  assert not data.same_tokenizer(run.tokenizer, run.teacher_tokenizer)
  assert len(run.teacher_tokenizer) == 512 and run.teacher.cfg.model_type == "llama"
  assert 0.3 < run.loader.stats["align_coverage"] <= 1.0
  assert "of student tokens end where a teacher token ends" in run.loader.summary()
  # The rows the step sees: each aligned pair ends at the same character in both tokenizations. The
  # decoded prefixes up to the two tokens of a pair hold the same text (the SentencePiece-style decoder
  # spells spaces around special tokens its own way, so whitespace is left out of the comparison).
  batch = next(run.loader)
  text = lambda tok, ids: "".join(tok.decode(ids).split())
  for r in range(2):
    n = int(batch["align_mask"][r].sum())
    real_s = int((batch["segment_ids"][r] > 0).sum())
    assert 0.5 * real_s < n < real_s  # most student tokens have a partner, not all
    assert n < int((batch["teacher_segment_ids"][r] > 0).sum())  # and not every teacher token
    for i, j in zip(batch["align_student"][r][:n], batch["align_teacher"][r][:n]):
      assert text(run.tokenizer, batch["input_ids"][r][: i + 1]) == text(
          run.teacher_tokenizer, batch["teacher_input_ids"][r][: j + 1]), (i, j)
  run.train()
  hist = _train_history(workdir, "hidden")
  assert len(hist) == 16 and np.mean(hist[-3:]) < 0.6 * np.mean(hist[:3]), hist


def test_tiny_qwen2_teacher_into_llama_student(tmp_path):
  """Qwen2 teacher (width 128) -> Llama student (width 48), one objective: w*hidden + alpha*KD + (1-alpha)*CE.

  Logit KD needs one tokenizer. transformers 5 loads a Qwen2 folder's tokenizer as Qwen2Tokenizer (its own
  NFC normaliser and split regex) and a Llama folder's as the saved tokenizer.json, so the two tiny models
  tokenize differently; the student takes the teacher's tokenizer, as a user distilling Qwen2 into a
  Llama-architecture student would."""
  workdir = str(tmp_path / "run")
  cfg = load_config("tiny_hidden", **{"workdir": workdir, "steps": 24, "checkpoint_every": 24,
                                      "student.path": "tiny:llama-student", "teacher.path": "tiny:teacher-trained",
                                      "student.tokenizer": "tiny:teacher-trained",
                                      "distill.kind": "forward_kl", "distill.alpha": 0.5, "distill.hidden.weight": 0.5})
  run = trainer.Run(cfg)
  assert (run.student.cfg.model_type, run.teacher.cfg.model_type) == ("llama", "qwen2")
  assert run.projector is not None and run.loss_cfg.layer_pairs == ((1, 1), (2, 3), (3, 4))
  assert not run.loss_cfg.cross_tokenizer
  run.train()
  for key in ("hidden", "kd", "loss"):
    hist = _train_history(workdir, key)
    assert np.mean(hist[-3:]) < 0.85 * np.mean(hist[:3]), (key, hist)
  with open(os.path.join(workdir, "export", "config.json")) as f:
    assert json.load(f)["model_type"] == "llama"
