"""On-policy distillation (jaxkd.on_policy, step.make_on_policy_step): the prompts cut from a packed batch, the
sampled rows, and the step's gradient on fixed samples against a float64 NumPy reference.

Samples are made fixed by greedy decoding (temperature 0): the reference takes them from `generate.generate`,
the public decode path that tests/test_generate_eval.py checks against transformers, on each prompt alone (no
padding), and scores them with the models' forward on each unpadded conversation. The step runs with plain SGD
at learning rate 1, so the change of the output head is minus its gradient. That the sampler follows the model's
distribution at a temperature and top-p is tests/test_sampling.py's chi-square test of the same decode loop.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxkd import generate, on_policy, optim, signals
from jaxkd import step as step_lib
from jaxkd.models import Transformer
from tests.steps import STUDENT, TEACHER, V, loss_config
from tests.test_losses import np_divergence

T, N = 24, 8  # row length and new tokens: prompts keep their last 16 tokens
P = T - N


def packed(seed: int = 0) -> dict:
  """Two packed rows. Row 0: a 12-token conversation trained from its 7th token (prompt of 6), then an 8-token one
  trained from its 5th (prompt of 4), then padding. Row 1: one 22-token conversation trained from its 19th token
  (a prompt of 18, longer than P: its last 16 stay), so its second prompt slot is empty."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, V, (2, T)).astype(np.int32)
  seg = np.zeros((2, T), np.int32)
  seg[0, :12], seg[0, 12:20], seg[1, :22] = 1, 2, 1
  trained = np.zeros((2, T), np.float32)  # which tokens are trained; the loss mask is shifted by one
  trained[0, 6:12], trained[0, 16:20], trained[1, 18:22] = 1, 1, 1
  pos = np.zeros((2, T), np.int32)
  for r in range(2):
    for s in (1, 2):
      idx = np.flatnonzero(seg[r] == s)
      pos[r, idx] = np.arange(len(idx))
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  targets = np.zeros_like(ids)
  targets[:, :-1] = np.where(same, ids[:, 1:], 0)
  mask = np.zeros_like(trained)
  mask[:, :-1] = np.where(same, trained[:, 1:], 0)
  return {"input_ids": ids, "targets": targets, "loss_mask": mask, "segment_ids": seg, "positions": pos}


# The prompts `packed` holds, slot by slot (2 per row): (row, first token, last token + 1); None for no prompt.
PROMPTS = [(0, 0, 6), (0, 12, 16), (1, 0, 18), None]


def test_prompts_are_each_conversation_up_to_its_first_trained_token():
  batch = packed()
  ids, mask, truncated = jax.device_get(on_policy.prompts(jax.tree.map(jnp.asarray, batch), P, 2))
  assert ids.shape == mask.shape == (4, P)
  for slot, where in enumerate(PROMPTS):
    if where is None:
      assert not mask[slot].any() and not ids[slot].any()
      continue
    r, a, b = where
    want = batch["input_ids"][r, a:b][-P:]
    assert mask[slot].tolist() == [0] * (P - len(want)) + [1] * len(want)  # left-padded
    np.testing.assert_array_equal(ids[slot, P - len(want):], want)
  assert truncated.tolist() == [False, False, True, False]  # row 1's 18-token prompt kept its last 16


@pytest.fixture(scope="module")
def models():
  student = Transformer(dataclasses.replace(STUDENT, tie_embeddings=False), rngs=nnx.Rngs(0))
  teacher = Transformer(TEACHER, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
  return student, teacher


def logits_of(model, ids) -> np.ndarray:
  return np.asarray(model(jnp.asarray([ids], jnp.int32))[0, :, :V], np.float64)


def hidden_of(model, ids) -> np.ndarray:
  return np.asarray(model.forward(jnp.asarray([ids], jnp.int32), compute_logits=False).last_hidden[0], np.float64)


@pytest.mark.parametrize("kind,seq_kd", [("reverse_kl", False), ("jsd", False), ("forward_kl", True)])
def test_on_policy_step_gradient_on_fixed_samples_equals_a_float64_reference(models, kind, seq_kd):
  """The step's change of the student's output head under SGD(1) is minus the gradient of
  sum over sampled tokens of tau^2 D(teacher || student) / (number of sampled tokens) (alpha 1 on the student's own
  samples; the configured alpha * D + (1 - alpha) * CE on the teacher's under seq_kd), from float64 NumPy over the
  greedy completions; nothing of the prompts and nothing of an empty prompt's row counts."""
  student, teacher = models
  writer = teacher if seq_kd else student
  batch = packed()
  prompts = [batch["input_ids"][r, a:b][-P:].tolist() for r, a, b in PROMPTS[:3]]
  free = generate.generate(writer, prompts, max_new_tokens=N, temperature=0.0, vocab_size=V)
  eos = free[0][2]  # a token the first row writes third: it stops there (the end id kept), others run to N
  done = generate.generate(writer, prompts, max_new_tokens=N, eos_ids=(eos,), temperature=0.0, vocab_size=V)
  assert len(done[0]) == 3 and any(len(x) == N for x in done)

  lc = loss_config(kind=kind, alpha=0.5, temperature=2.0, beta=0.3, vocab_size=V, chunk_size=16)
  rollout = on_policy.Rollout(max_new_tokens=N, prompt_len=P, prompts_per_row=2, temperature=0.0, top_p=None,
                              top_k=None, eos_ids=(eos,), vocab_size=V, seq_kd=seq_kd)
  s_def, s_state = nnx.split(student)
  t_def, t_state = nnx.split(teacher)
  params = {"student": jax.tree.map(jnp.copy, nnx.to_pure_dict(s_state))}  # the step donates its copy
  sgd = optim.skip_nonfinite(optax.sgd(1.0))
  fn = step_lib.make_on_policy_step(s_def, signals.online(t_def), sgd, optax.constant_schedule(1.0), lc, rollout)
  head = np.asarray(params["student"]["lm_head"]["kernel"], np.float64)
  state = step_lib.TrainState(step=jnp.int32(0), params=params, opt_state=sgd.init(params),
                              rng=on_policy.initial_key(0))
  new, metrics = fn(state, nnx.to_pure_dict(t_state), jax.tree.map(jnp.asarray, batch))
  got = head - np.asarray(new.params["student"]["lm_head"]["kernel"], np.float64)

  # float64: each conversation alone, scored on its completion's tokens only.
  alpha = 0.5 if seq_kd else 1.0
  tokens = [(p, c) for p, c in zip(prompts, done)]
  n = sum(len(c) for _, c in tokens)
  feats = [(hidden_of(student, p + c)[len(p) - 1:-1], logits_of(teacher, p + c)[len(p) - 1:-1], np.asarray(c))
           for p, c in tokens]

  def loss(w):
    total = 0.0
    for h, zt, labels in feats:
      zs = (h @ w)[:, :V]
      total += alpha * 4.0 * np.sum(np_divergence(zs, zt, kind, tau=2.0, beta=0.3))  # tau^2 D
      if alpha < 1:
        z = zs - zs.max(-1, keepdims=True)
        nll = -(z[np.arange(len(labels)), labels] - np.log(np.exp(z).sum(-1)))
        total += (1 - alpha) * np.sum(nll)
    return total / n

  want = np.zeros_like(head)
  eps = 1e-6
  for i in np.ndindex(*head.shape):
    up, down = head.copy(), head.copy()
    up[i] += eps
    down[i] -= eps
    want[i] = (loss(up) - loss(down)) / (2 * eps)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
  np.testing.assert_allclose(float(metrics["loss"]), loss(head), rtol=2e-5, atol=1e-6)
  assert float(metrics["tokens"]) == n and float(metrics["prompts"]) == 3
  assert float(metrics["prompts_truncated"]) == 1
  assert float(metrics["sampled_ended"]) == pytest.approx(sum(c[-1] == eos for c in done) / 3)
  assert not np.array_equal(np.asarray(new.rng), np.asarray(on_policy.initial_key(0)))  # the key moved on


def test_chosen_steps_are_a_share_fixed_by_seed_and_step():
  picks = [on_policy.chosen(3, s, 0.25) for s in range(1, 4001)]
  assert abs(np.mean(picks) - 0.25) < 0.03
  assert picks == [on_policy.chosen(3, s, 0.25) for s in range(1, 4001)]  # the same on every call
  assert picks != [on_policy.chosen(4, s, 0.25) for s in range(1, 4001)]
  assert not any(on_policy.chosen(3, s, 0.0) for s in range(1, 100))
  assert all(on_policy.chosen(3, s, 1.0) for s in range(1, 100))
