"""Interrupted and damaged runs: kill -9 (mid-save too) and SIGTERM resume bitwise; damaged checkpoints fall
back to the previous good one or stop the run; a failed background save stops it; NaN/Inf steps are skipped
or stop the run and never reach a checkpoint.

The reference is one uninterrupted run in this process; the interrupted runs are `python -m jaxkd.train`
subprocesses with the same numerics (tests/runs.py), so "bitwise" compares the two paths as a user meets them.
"""

import errno
import glob
import json
import logging
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxkd import checkpoint as ckpt_lib
from jaxkd import step as step_lib
from jaxkd import trainer
from tests import runs
from tests.runs import load_config
from tests.steps import build_step, loss_config, packed_batch

# Ten steps, checkpoints at 3, 6, 9 and 10; no held-out split (evaluation is tested elsewhere).
RUN = {"steps": 10, "checkpoint_every": 3, "data.eval_fraction": 0.0, "export.dtype": "float32",
       "progress": False}
# The interrupted run: most steps (2, 3, 4, 5, 7, 8, 9, as jaxkd.on_policy.chosen draws them for seed 0 at 0.5)
# train on the student's own samples, so a resume must restore the sampling key too.
KILLED_RUN = {**RUN, "distill.on_policy.fraction": 0.5, "distill.on_policy.max_new_tokens": 16}
ON_POLICY_KEYS = ("prompts", "sampled_len", "sampled_ended")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(train metric rows, exported safetensors bytes) of the uninterrupted run."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  trainer.run(load_config(workdir=workdir, **KILLED_RUN))
  return runs.train_rows(workdir), runs.export_bytes(workdir)


def test_killed_and_preempted_runs_resume_bitwise(tmp_path, reference):
  """SIGTERM, then kill -9 during a save, between saves and during the final save; each time the same
  command again. The final metrics (every step, each from the run that last computed it, the on-policy steps'
  sample lengths included) and the export equal the uninterrupted run's bitwise."""
  workdir = str(tmp_path / "run")
  # Every save is held open 2 s (a test hook), so a kill can land inside one.
  cmd = runs.command(workdir, **KILLED_RUN, **{"debug.save_delay_s": 2.0})
  logs = iter(str(tmp_path / f"log{i}.txt") for i in range(10))

  # 1. SIGTERM soon after the first step: the run saves the step it reaches and exits with 75.
  p = runs.Proc(cmd, next(logs))
  p.wait_for(lambda: runs.last_step(workdir) >= 1, "step 1 in metrics.jsonl")
  p.signal(signal.SIGTERM)
  assert p.wait() == 75, p.tail()  # EX_TEMPFAIL, jaxkd.train.EXIT_PREEMPTED
  preempted = runs.finished_steps(workdir)[-1]
  assert f"preempted: saved checkpoint step {preempted}" in p.output()
  assert runs.last_step(workdir) == preempted  # metrics are written up to the saved step, no further
  assert preempted < 6, f"SIGTERM reached the run only at step {preempted}; the chain below needs < 6"

  # SIGTERM while starting again (models loaded, checkpoint not yet restored): 75 at once, nothing touched.
  p = runs.Proc(cmd + ["--config.debug.start_delay_s=120"], next(logs))
  p.wait_for(lambda: "start-up held" in p.output(), "start-up to reach debug.start_delay_s")
  p.signal(signal.SIGTERM)
  assert p.wait(timeout=60) == 75, p.tail()
  assert "preempted (SIGTERM) while starting" in p.output()
  assert runs.finished_steps(workdir)[-1] == preempted and runs.last_step(workdir) == preempted

  # 2. kill -9 while the next regular checkpoint is being written: only its temporary folder exists.
  saving = 3 * (preempted // 3 + 1)
  p = runs.Proc(cmd, next(logs))
  p.wait_for(lambda: runs.unfinished(workdir, saving), f"the save of step {saving} to start")
  p.kill()
  assert runs.unfinished(workdir, saving) and saving not in runs.finished_steps(workdir)
  assert f"resuming from step {preempted}" in p.output()

  # 3. kill -9 between saves, two steps after that checkpoint finished: metrics.jsonl runs ahead of it.
  p = runs.Proc(cmd, next(logs))
  p.wait_for(lambda: saving in runs.finished_steps(workdir) and runs.last_step(workdir) >= saving + 2,
             f"checkpoint {saving} and step {saving + 2}")
  p.kill()
  assert f"resuming from step {preempted}" in p.output()
  assert not runs.unfinished(workdir, saving)  # the unfinished folder of the killed save was cleaned up

  # 4. kill -9 during the final save (step 10): 9 is finished then, 10 is not.
  p = runs.Proc(cmd, next(logs))
  p.wait_for(lambda: runs.unfinished(workdir, 10), "the save of step 10 to start")
  p.kill()
  assert 9 in runs.finished_steps(workdir) and 10 not in runs.finished_steps(workdir)
  assert f"resuming from step {saving}" in p.output()

  # 5. The same command once more finishes the run.
  p = runs.Proc(cmd, next(logs))
  assert p.wait() == 0, p.tail()
  assert "resuming from step 9" in p.output()
  want_rows, want_export = reference
  runs.assert_same_rows(runs.train_rows(workdir), want_rows, keys=runs.TRAIN_KEYS + ON_POLICY_KEYS)
  assert [r["step"] for r in want_rows if "prompts" in r] == [2, 3, 4, 5, 7, 8, 9]  # on-policy steps ran
  assert runs.export_bytes(workdir) == want_export
  assert not runs.unfinished(workdir)


def test_a_run_stopped_between_a_save_and_its_evaluation_evaluates_on_resume(tmp_path):
  """The checkpoint of an eval step is saved before the evaluation; a run stopped in between (a preemption
  notice there, a kill) resumes from that step and evaluates it then, so no eval point is lost."""
  workdir = str(tmp_path / "run")
  settings = {"steps": 4, "checkpoint_every": 2, "eval_every": 2, "progress": False, "export.enabled": False}
  trainer.run(load_config(workdir=workdir, **settings))
  rows = runs.metric_rows(workdir)
  want = [r for r in rows if "eval_loss" in r]
  assert [r["step"] for r in want] == [2, 4]
  # What a stop right after the save of step 2 leaves: metrics up to step 2's training line, checkpoint 2.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  cut = next(i for i, r in enumerate(rows) if "eval_loss" in r)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows[:cut])
  trainer.run(load_config(workdir=workdir, **settings))
  got = [r for r in runs.metric_rows(workdir) if "eval_loss" in r]
  assert [r["step"] for r in got] == [2, 4]
  for a, b in zip(got, want):
    assert {k: v for k, v in a.items() if k != "time"} == {k: v for k, v in b.items() if k != "time"}


# --------------------------------------------------------------------------------------------------------
# Damaged checkpoints.


def _array_files(step_dir):
  return sorted(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*")), key=os.path.getsize)


def test_damaged_checkpoints_fall_back_to_the_newest_good_one(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  cfg = dict(RUN, steps=8, checkpoint_every=2, max_to_keep=4)
  trainer.run(load_config(workdir=workdir, **cfg))
  want_rows, want_export = runs.train_rows(workdir), runs.export_bytes(workdir)
  ck = os.path.join(workdir, "checkpoints")
  assert runs.finished_steps(workdir) == [2, 4, 6, 8]
  os.remove(os.path.join(ck, "8", "meta", "metadata"))  # metadata missing
  big = _array_files(os.path.join(ck, "6"))[-1]
  with open(big, "r+b") as f:  # an array file cut short
    f.truncate(os.path.getsize(big) // 2)
  # Arrays of another step in place of step 4's: Orbax reads them without complaint, the checksums do not.
  shutil.rmtree(os.path.join(ck, "4", "state"))
  shutil.copytree(os.path.join(ck, "2", "state"), os.path.join(ck, "4", "state"))
  os.makedirs(os.path.join(ck, "10.orbax-checkpoint-tmp", "state"))  # an unfinished save: ignored

  with caplog.at_level(logging.INFO, logger="jaxkd"):
    trainer.run(load_config(workdir=workdir, **cfg))
  text = caplog.text
  for step, why in ((8, "FileNotFoundError"), (6, ""), (4, "differ from the checksums saved with them")):
    assert f"checkpoint {os.path.join(ck, str(step))} is damaged and cannot be restored" in text, text
    assert why in text
  assert "resuming from checkpoint step 2, the newest one that restores" in text
  assert "resuming from step 2" in text
  runs.assert_same_rows(runs.train_rows(workdir), want_rows)
  assert runs.export_bytes(workdir) == want_export
  # Nothing is deleted: the damaged checkpoints were moved aside; the unfinished folder was removed.
  moved = sorted(int(n.split("-")[0]) for n in os.listdir(ck + ".damaged"))
  assert moved == [4, 6, 8]
  assert not runs.unfinished(workdir)

  # When no checkpoint restores: an error naming each, never a fresh start, nothing moved.
  for step in runs.finished_steps(workdir):
    os.remove(os.path.join(ck, str(step), "meta", "metadata"))
  before = sorted(os.listdir(ck))
  with pytest.raises(ckpt_lib.CheckpointError, match=r"holds checkpoints \[2, 4, 6, 8\] but none of them can "
                                                     r"be restored:\n.*/checkpoints/8: FileNotFoundError"):
    trainer.run(load_config(workdir=workdir, **cfg))
  assert sorted(os.listdir(ck)) == before


def _wait_until_unchanged(folder, quiet_s=1.0, timeout_s=60.0):
  def listing():
    return sorted((root, n, os.path.getsize(os.path.join(root, n))) for root, _, names in os.walk(folder)
                  for n in names if os.path.exists(os.path.join(root, n)))
  seen, since, deadline = listing(), time.time(), time.time() + timeout_s
  while time.time() < deadline and time.time() - since < quiet_s:
    time.sleep(0.1)
    now = listing()
    if now != seen:
      seen, since = now, time.time()


def test_a_failed_background_save_stops_the_run(tmp_path, monkeypatch):
  """An error raised inside the asynchronous write (here ENOSPC, injected) ends the run with it; the
  checkpoints finished before are intact and the run resumes from them."""
  workdir = str(tmp_path / "run")
  cfg = dict(RUN, steps=10, checkpoint_every=2)
  original = ckpt_lib._MetaHandler._save_fn

  async def failing(self, x, directory):
    if x["step"] >= 4:
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await original(self, x, directory)

  monkeypatch.setattr(ckpt_lib._MetaHandler, "_save_fn", failing)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"saving checkpoint step 4 into .*/checkpoints failed: "
                                                     r"OSError: \[Errno 28\] No space left on device.*"
                                                     r"checkpoints \[2\] are intact.*resume from step 2"):
    trainer.run(load_config(workdir=workdir, **cfg))
  assert runs.finished_steps(workdir) == [2]
  # It stops at the first step after the save fails (how many steps that takes depends on the machine's
  # load) and at the latest at the next save (step 6), which waits for the failed one: never at the end.
  assert runs.last_step(workdir) <= 6
  monkeypatch.setattr(ckpt_lib._MetaHandler, "_save_fn", original)
  # The failed save's other arrays are still being written by TensorStore threads for a moment after the
  # error. A new process never sees them (they die with the old one); this one waits for them to end.
  _wait_until_unchanged(os.path.join(workdir, "checkpoints"))
  trainer.run(load_config(workdir=workdir, **cfg))
  assert runs.finished_steps(workdir)[-1] == 10 and [r["step"] for r in runs.train_rows(workdir)] == list(range(1, 11))


# --------------------------------------------------------------------------------------------------------
# NaN and Inf.


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_a_nonfinite_step_leaves_parameters_and_optimizer_state_unchanged():
  lc = loss_config(alpha=0.5, vocab_size=61)
  fn, state, t_params = build_step(lc, steps=4)
  state, m = fn(state, t_params, packed_batch(0))
  assert float(m["nonfinite"]) == 0.0
  before = jax.device_get(state)
  bad = packed_batch(1)
  bad["targets"][2, 3] = 10_000  # outside the vocabulary, on a trained token: the cross entropy is NaN
  assert bad["loss_mask"][2, 3] > 0
  state, m = fn(state, t_params, bad)
  assert np.isnan(float(m["loss"])) and float(m["nonfinite"]) == 1.0
  after = jax.device_get(state)
  assert int(after.step) == int(before.step) + 1
  # The optimizer's state is its moments and schedule count (inner_state), unchanged, and its count of
  # skipped updates, which the skip advanced (it is how a checkpoint keeps that count).
  _assert_same((after.params, after.opt_state.inner_state), (before.params, before.opt_state.inner_state))
  assert int(after.opt_state.total_notfinite) == int(before.opt_state.total_notfinite) + 1

  # An Inf in a parameter makes the loss and the gradients non-finite: skipped as well, the Adam moments
  # are not poisoned.
  emb = after.params["student"]["embed_tokens"]["embedding"].copy()
  emb[0, 0] = np.inf
  params = {"student": {**after.params["student"], "embed_tokens": {"embedding": emb}}}
  state = step_lib.TrainState(step=jnp.asarray(after.step), params=jax.tree.map(jnp.asarray, params),
                              opt_state=jax.tree.map(jnp.asarray, after.opt_state))
  state, m = fn(state, t_params, packed_batch(2))
  assert float(m["nonfinite"]) == 1.0
  _assert_same(jax.device_get((state.params, state.opt_state.inner_state)), (params, after.opt_state.inner_state))

  # The same batch without the bad target updates the parameters.
  fn, state, t_params = build_step(lc, steps=4)
  state, _ = fn(state, t_params, packed_batch(0))
  state, m = fn(state, t_params, packed_batch(1))
  assert float(m["nonfinite"]) == 0.0
  assert not np.array_equal(jax.device_get(state.params["student"]["embed_tokens"]["embedding"]),
                            before.params["student"]["embed_tokens"]["embedding"])


def _saved_arrays(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def test_a_poisoned_batch_is_skipped_and_counted(tmp_path):
  workdir = str(tmp_path / "run")
  trainer.run(load_config(workdir=workdir, **dict(RUN, steps=4, checkpoint_every=1, max_to_keep=5),
                          **{"debug.poison_step": 2}))
  rows = runs.train_rows(workdir)
  assert [r["skipped_nonfinite"] for r in rows] == [0, 1, 1, 1]
  assert np.isnan(rows[1]["loss"]) and all(np.isfinite(r["loss"]) for r in rows if r["step"] != 2)
  one, two, three = (_saved_arrays(workdir, s) for s in (1, 2, 3))
  # Step 2 changed nothing but the optimizer's count of skipped updates, which the checkpoint keeps.
  _assert_same((one["params"], one["opt_state"]["inner_state"]), (two["params"], two["opt_state"]["inner_state"]))
  assert (int(one["opt_state"]["total_notfinite"]), int(two["opt_state"]["total_notfinite"])) == (0, 1)
  assert not np.array_equal(two["params"]["student"]["embed_tokens"]["embedding"],
                            three["params"]["student"]["embed_tokens"]["embedding"])
  for leaf in jax.tree.leaves(two["params"]):
    assert np.isfinite(leaf).all()


def test_nonfinite_stop_ends_the_run_before_saving_that_step(tmp_path):
  workdir = str(tmp_path / "run")
  cfg = load_config(workdir=workdir, **dict(RUN, steps=4, checkpoint_every=1, max_to_keep=5),
                    **{"debug.poison_step": 3, "nonfinite": "stop"})
  with pytest.raises(trainer.NonFiniteError, match=r"step 3: the loss or gradients hold NaN or Inf.*"
                                                   r"run stops \(config\.nonfinite=\"stop\"\)\. The last checkpoint "
                                                   r"is step 2"):
    trainer.run(cfg)
  assert runs.finished_steps(workdir) == [1, 2]
  assert runs.last_step(workdir) == 3


def test_a_checkpoint_never_holds_nonfinite_arrays(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
  good = step_lib.TrainState(step=jnp.int32(1), params={"w": jnp.ones((4, 3))}, opt_state={"mu": jnp.zeros(3)})
  ck.save(good, [{}], {}, step=1)
  ck.wait()
  bad = good.replace(step=jnp.int32(2), params={"w": jnp.ones((4, 3)).at[1, 2].set(jnp.nan)})
  with pytest.raises(ckpt_lib.NonFiniteError, match=r"not saving step 2: 1 array\(s\) hold NaN or Inf, e\.g\. "
                                                    r"\[\"\['params'\]\['w'\]\"\].*last good checkpoint is step 1"):
    ck.save(bad, [{}], {}, step=2)
  ck.close()
  assert runs.finished_steps(str(tmp_path)) == [1] and not runs.unfinished(str(tmp_path))


def test_a_checkpoint_of_another_state_layout_is_named_and_kept(tmp_path):
  """A checkpoint written by another jaxkd version (another optimizer-state tree) is not called damaged and
  not moved: the error says to resume it with the version that wrote it."""
  ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
  old = step_lib.TrainState(step=jnp.int32(2), params={"w": jnp.ones((4, 3))}, opt_state={"mu": jnp.zeros(3)})
  ck.save(old, [{}], {}, step=2)
  ck.wait()
  new = old.replace(opt_state={"inner_state": {"mu": jnp.zeros(3)}, "total_notfinite": jnp.int32(0)})
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), new)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"most likely written by another jaxkd version.*resume it "
                                                     r"with the version that wrote it\. Nothing was changed"):
    ck.restore_latest(abstract)
  assert ck.all_steps() == [2] and not os.path.exists(str(tmp_path / "checkpoints.damaged"))
