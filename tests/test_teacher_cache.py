"""The offline teacher: `python -m jaxkd.capture` over the bundled tiny teacher, the cache read back with
`jaxkd.teacher_cache.open`, a run trained from it, and what a cache that cannot serve a run is told.

One capture (6 steps x 8 rows, 3 shards of 2 batches, k = 16) is made once and shared. The stored top-k is checked
against the teacher's own distribution, computed apart with jaxkd's teacher model (itself tested against transformers
in test_models.py); the loss over it against float64 in test_sparse_loss.py.
"""

import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest

from jaxkd import capture, models, program, teacher_cache, trainer
from jaxkd.teacher_cache import store
from tests import runs
from tests.runs import load_config

K = 16
SETUP = {"steps": 6, "capture.top_k": K, "capture.shard_batches": 2, "samples.count": 0, "export.enabled": False,
         "eval_every": 0}


def _config(tmp, **overrides):
  return load_config(**{"workdir": str(tmp / "run"), "capture.dir": str(tmp / "cache"), **SETUP, **overrides})


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("capture")
  cfg = _config(tmp)
  assert capture.capture(cfg) == 0
  return cfg, tmp


def test_the_cache_holds_the_teachers_top_k_at_every_trained_token(captured):
  cfg, _ = captured
  rows = teacher_cache.open(cfg.capture.dir)
  assert len(rows) == cfg.steps * cfg.data.batch_size == 48
  assert sorted(os.listdir(cfg.capture.dir)) == [".data_cache", "manifest.json"] + [
      f"shard-00000-0000{i}.parquet" for i in range(3)]
  teacher = models.from_pretrained(program.model_folder(cfg.teacher), dtype="float32")
  vocab = int(rows.manifest["vocab_size"])
  for i in (0, 17, 47):
    row = rows[i]
    t = cfg.data.seq_len
    assert row["input_ids"].shape == (t,) and row["indices"].shape == (t, K) and row["logprobs"].dtype == np.float32
    np.testing.assert_array_equal(row["signal_mask"], row["loss_mask"] > 0)
    assert row["signal_mask"].sum() > 0
    z = teacher(jnp.asarray(row["input_ids"][None]), segment_ids=jnp.asarray(row["segment_ids"][None]),
                positions=jnp.asarray(row["positions"][None]))[0, :, :vocab]
    logp = np.asarray(jax.nn.log_softmax(z.astype(jnp.float32), axis=-1))
    want_idx = np.argsort(-logp, axis=-1, kind="stable")[:, :K]
    m = row["signal_mask"]
    np.testing.assert_array_equal(row["indices"][m], want_idx[m])
    want_lp = np.take_along_axis(logp, want_idx, -1)[m]
    np.testing.assert_allclose(row["logprobs"][m], want_lp, rtol=2**-8, atol=1e-6)  # stored as bfloat16
    assert np.all(np.diff(row["logprobs"][m], axis=-1) <= 0)  # most likely first
    assert np.all(row["logprobs"][~m] == -np.inf) and not row["indices"][~m].any()


def test_the_shards_load_with_datasets(captured):
  import datasets  # pylint: disable=import-outside-toplevel
  cfg, _ = captured
  ds = datasets.load_dataset("parquet", data_files=os.path.join(cfg.capture.dir, "shard-*.parquet"), split="train")
  assert len(ds) == 48 and set(store.ROW_KEYS) < set(ds.column_names)
  first = teacher_cache.open(cfg.capture.dir)[0]
  assert ds[0]["input_ids"] == first["input_ids"].tolist()


def test_a_capture_cut_short_and_rerun_gives_the_same_shards(captured, tmp_path, monkeypatch):
  """A kill leaves whole shards (written to a temporary name, then renamed) and maybe a temporary file; the rerun
  continues after the last whole shard. SIGTERM finishes the open shard and exits 75."""
  cfg, _ = captured
  again = _config(tmp_path)
  write = store.write_shard

  def write_then_sigterm(path, tables):
    write(path, tables)
    os.kill(os.getpid(), signal.SIGTERM)  # as a preemption notice arriving during the first shard would

  monkeypatch.setattr(store, "write_shard", write_then_sigterm)
  assert capture.capture(again) == capture.EXIT_PREEMPTED
  monkeypatch.setattr(store, "write_shard", write)
  assert sorted(f for f in os.listdir(again.capture.dir) if f.endswith(".parquet")) == ["shard-00000-00000.parquet"]
  with open(store.shard_path(again.capture.dir, 0, 1) + ".tmp", "wb") as f:
    f.write(b"half a shard")  # what a kill -9 during the next write leaves
  assert store.read_manifest(again.capture.dir)["complete"] is False
  assert capture.capture(again) == 0
  for i in range(3):
    name = f"shard-00000-0000{i}.parquet"
    a, b = (pq.read_table(os.path.join(d, name)) for d in (cfg.capture.dir, again.capture.dir))
    assert a.equals(b), name


def test_a_run_from_the_cache_loads_no_teacher_and_learns(captured, tmp_path):
  cfg, _ = captured
  run = trainer.Run(load_config(**{**SETUP, "workdir": str(tmp_path / "run"), "teacher.cache": cfg.capture.dir,
                                   "teacher.path": ""}))
  assert run.teacher is None and run.program.teacher_params is None
  summary = run.train()
  lines = [l for l in open(os.path.join(summary["workdir"], "metrics.jsonl")) if '"kd"' in l]
  import json  # pylint: disable=import-outside-toplevel
  first, last = json.loads(lines[0]), json.loads(lines[-1])
  assert "teacher_ce" not in first and np.isfinite(first["kd"])
  assert last["kd"] < first["kd"] and last["loss"] < first["loss"]


def test_a_run_from_the_cache_resumes_exactly(captured, tmp_path, monkeypatch):
  """Stopped right after its step-3 checkpoint (the state a kill leaves), a rerun continues from the cache row
  and data position saved there and logs bitwise the steps of an uninterrupted run."""
  cfg, _ = captured
  make = lambda name: load_config(**{**SETUP, "workdir": str(tmp_path / name), "teacher.cache": cfg.capture.dir,
                                     "checkpoint_every": 3})
  trainer.Run(make("whole")).train()

  class Killed(Exception):
    pass

  save = trainer.Run._save

  def save_then_die(self, state, step):
    save(self, state, step)
    if step == 3:
      self.ckpt.wait()
      raise Killed

  monkeypatch.setattr(trainer.Run, "_save", save_then_die)
  with pytest.raises(Killed):
    trainer.Run(make("cut")).train()
  monkeypatch.setattr(trainer.Run, "_save", save)
  trainer.Run(make("cut")).train()
  runs.assert_same_rows(runs.train_rows(str(tmp_path / "cut")), runs.train_rows(str(tmp_path / "whole")))


def test_a_cache_that_cannot_serve_the_run_is_refused_naming_why(captured, tmp_path):
  cfg, _ = captured
  run = lambda **kw: trainer.Run(load_config(**{**SETUP, "workdir": str(tmp_path / "r"), "teacher.cache":
                                                cfg.capture.dir, **kw}))
  with pytest.raises(teacher_cache.CacheError, match=r"another setup: data\.seq_len: 128 there, 64 now\. Capture it again"):
    run(**{"data.seq_len": 64})
  with pytest.raises(teacher_cache.CacheError, match=r"reads 56 rows \(7 steps x 8\) but the teacher cache .* holds 48"):
    run(steps=7)
  with pytest.raises(teacher_cache.CacheError, match="no manifest.json"):
    run(**{"teacher.cache": str(tmp_path)})
  # A row whose tokens are not the run's: named, with the position.
  bad = tmp_path / "bad"
  shutil.copytree(cfg.capture.dir, bad)
  table = pq.read_table(bad / "shard-00000-00000.parquet").to_pylist()
  table[3]["input_ids"][5] += 1
  pq.write_table(store.pa.Table.from_pylist(table, schema=store.SCHEMA), bad / "shard-00000-00000.parquet")
  r = run(**{"teacher.cache": str(bad)})
  with pytest.raises(teacher_cache.CacheError, match=r"row 3 of the teacher cache .* input_ids differs at position 5"):
    r.train()
  # A damaged shard: named.
  with open(bad / "shard-00000-00001.parquet", "r+b") as f:
    f.truncate(100)
  with pytest.raises(teacher_cache.CacheError,
                     match=r"shard-00000-00001\.parquet is damaged or truncated .*process 0's rows of batches 2 to 3"):
    teacher_cache.open(str(bad))


def test_a_capture_of_another_setup_is_not_continued(captured):
  cfg, tmp = captured
  with pytest.raises(teacher_cache.CacheError, match=r"another setup \(k: 16 there, 8 now\)"):
    capture.capture(_config(tmp, **{"capture.top_k": 8}))
