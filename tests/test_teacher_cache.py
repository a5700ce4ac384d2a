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
from jaxkd.teacher_cache import codec, store
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
    # The same set of ids; their order is the stored log-probs' (ids one step apart or less may trade places).
    np.testing.assert_array_equal(np.sort(row["indices"][m], -1), np.sort(want_idx[m], -1))
    assert np.all(np.diff(row["logprobs"][m], axis=-1) <= 0)  # most likely first
    want_lp = np.take_along_axis(logp, row["indices"], -1)[m]
    within_quantization(row["logprobs"][m], want_lp)
    assert np.all(row["logprobs"][~m] == -np.inf) and not row["indices"][~m].any()


# The stored log-probs' quantization, derived from the scheme (jaxkd/teacher_cache/codec.py) at capture.logprob_step
# = 1/16: each is anchor - gap * STEP, the gap rounded (within STEP / 2 of the exact gap below the top), the anchor
# shared by a token's k values and off the top's log-prob by at most STEP / 2 (it scales the rounded probabilities
# back to the teacher's top-k mass). Gaps past 255 steps are clipped: those decode higher than the teacher's.
STEP = 1 / 16
FLOAT_TOL = 1e-5  # float32 storage, and the capture's jitted chunked log-softmax beside the test's own


def within_quantization(got_NxK, want_NxK):
  top_N = np.argmax(want_NxK, -1)  # its gap is 0: it decodes to the anchor
  top_lp_N = want_NxK.max(-1)
  shift_N = got_NxK[np.arange(len(top_N)), top_N] - top_lp_N
  assert np.abs(shift_N).max() <= STEP / 2 + FLOAT_TOL
  deep_NxK = top_lp_N[:, None] - want_NxK > 255 * STEP
  residual_NxK = got_NxK - want_NxK - shift_N[:, None]
  assert np.abs(residual_NxK[~deep_NxK]).max() <= STEP / 2 + FLOAT_TOL  # doubling the step breaks this
  assert np.all(got_NxK[deep_NxK] >= want_NxK[deep_NxK])
  # The top-k's mass is the teacher's (what a loss that gives the rest to the other ids relies on).
  np.testing.assert_allclose(np.exp(got_NxK).sum(-1), np.exp(want_NxK).sum(-1), rtol=1e-5)


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


def test_a_capture_killed_mid_way_and_rerun_gives_the_shards_of_an_uninterrupted_one(tmp_path):
  """kill -9 once three shards are written (the fourth under way), then the same command again: every shard equals
  the one an uninterrupted capture writes, bitwise."""
  overrides = {**SETUP, "steps": 16, "capture.shard_batches": 1, "progress": False,
               "capture.dir": str(tmp_path / "killed")}
  cmd = runs.command(str(tmp_path / "run"), **overrides)
  cmd[cmd.index("jaxkd.train")] = "jaxkd.capture"
  proc = runs.Proc(cmd, str(tmp_path / "capture.txt"))
  shard = lambda i: store.shard_path(overrides["capture.dir"], 0, i)
  proc.wait_for(lambda: os.path.exists(shard(2)), "three shards")
  proc.kill()
  written = [i for i in range(16) if os.path.exists(shard(i))]
  assert 3 <= len(written) < 16 and not store.read_manifest(overrides["capture.dir"])["complete"], written
  rc, out = runs.run(cmd, str(tmp_path / "again.txt"))
  assert rc == 0, out[-3000:]
  assert capture.capture(load_config(**{**overrides, "capture.dir": str(tmp_path / "whole")})) == 0
  for i in range(16):
    a, b = (pq.read_table(store.shard_path(str(tmp_path / d), 0, i)) for d in ("killed", "whole"))
    assert a.equals(b), i


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
  with pytest.raises(teacher_cache.CacheError, match=r"holds the log-probs of tiny:teacher-trained, but this run "
                                                     r"names teacher.path='tiny:teacher'"):
    run(**{"teacher.path": "tiny:teacher"})
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


# ---------------------------------------------------------------------------------------------------------------
# The encoding on its own, at Qwen2's vocabulary


def _peaked_topk(rng, n, vocab, k):
  """n tokens' top-k of peaked distributions over `vocab` ids (a few bumps over a wide tail), float64."""
  logits_NxV = rng.normal(size=(n, vocab)) * 2.0
  logits_NxV[np.arange(n)[:, None], rng.integers(0, vocab, (n, 3))] += [12.0, 9.0, 7.0]
  logp_NxV = logits_NxV - np.log(np.exp(logits_NxV - logits_NxV.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits_NxV.max(-1, keepdims=True)
  idx_NxK = np.argsort(-logp_NxV, -1)[:, :k]
  return idx_NxK, np.take_along_axis(logp_NxV, idx_NxK, -1)


def test_a_round_trip_is_within_the_quantization_and_a_doubled_step_is_not():
  rng = np.random.default_rng(0)
  vocab, k = 151_936, 128
  idx_NxK, lp_NxK = _peaked_topk(rng, 24, vocab, k)
  lp_NxK[:, 100:] -= 20.0  # a tail deeper than 255 steps: clipped
  got_idx, got_lp = codec.decode(*codec.encode(idx_NxK, lp_NxK.astype(np.float32), vocab, STEP), vocab, STEP)
  np.testing.assert_array_equal(np.sort(got_idx, -1), np.sort(idx_NxK, -1))
  assert got_idx.dtype == np.int32 and got_lp.dtype == np.float32
  within_quantization(got_lp, _at(idx_NxK, lp_NxK, got_idx))
  coarse_idx, coarse_lp = codec.decode(*codec.encode(idx_NxK, lp_NxK, vocab, 2 * STEP), vocab, 2 * STEP)
  with pytest.raises(AssertionError):
    within_quantization(coarse_lp, _at(idx_NxK, lp_NxK, coarse_idx))


def _at(idx_NxK, lp_NxK, where_NxK):
  """lp_NxK's values at the ids where_NxK (a reordering of idx_NxK's in each row)."""
  order_NxK = np.argsort(idx_NxK, -1)
  sorted_NxK = np.take_along_axis(idx_NxK, order_NxK, -1)
  pos_NxK = np.stack([np.searchsorted(s_K, w_K) for s_K, w_K in zip(sorted_NxK, where_NxK)])
  return np.take_along_axis(np.take_along_axis(lp_NxK, order_NxK, -1), pos_NxK, -1)


def test_a_tokens_bytes_are_the_documented_formula():
  """Elias-Fano ids: k low parts of floor(log2(vocab / k)) bits and k + (vocab - 1 >> low) + 1 unary bits, padded to
  bytes; then k uint8 gaps and a float32 anchor. At k = 128 of Qwen2's 151,936 ids: 10-bit low parts, 1,557 bits,
  195 bytes of ids and 327 in all (DistillKit's recommended scheme: 344; MaxText's float32 + int64: 1,536)."""
  import math  # pylint: disable=import-outside-toplevel
  vocab, k, n = 151_936, 128, 5
  low = math.floor(math.log2(vocab / k))
  assert low == 10 and k * low + k + (vocab - 1) // 2**low + 1 == 1557
  assert codec.id_bytes(k, vocab) == 195 and codec.token_bytes(k, vocab) == 327
  assert codec.token_bytes(16, 768) == math.ceil((16 * 5 + 16 + 767 // 32 + 1) / 8) + 16 + 4 == 35
  idx_NxK, lp_NxK = _peaked_topk(np.random.default_rng(1), n, vocab, k)
  t = 8
  batch = {key: np.arange(t, dtype=np.int32) for key in store.ROW_KEYS}
  batch["loss_mask"] = (np.arange(t) % 2).astype(np.float32)  # 4 trained tokens of 8
  batch = {key: v[None] for key, v in batch.items()}
  idx_BxTxK = np.zeros((1, t, k), np.int32)
  lp_BxTxK = np.zeros((1, t, k), np.float32)
  idx_BxTxK[0, 1::2], lp_BxTxK[0, 1::2] = idx_NxK[:4], lp_NxK[:4]
  record = store.encode_rows(batch, idx_BxTxK, lp_BxTxK, 0, vocab_size=vocab, step=STEP).to_pylist()[0]
  stored = sum(len(record[key]) for key in ("topk_ids", "topk_gaps")) + 4 * len(record["topk_anchor"])
  assert stored == 4 * 327
  row = store.decode_row(record, k, "here", vocab_size=vocab, step=STEP)
  assert row["indices"].shape == (t, k) and (row["logprobs"][::2] == -np.inf).all()
  np.testing.assert_array_equal(np.sort(row["indices"][1::2], -1), np.sort(idx_NxK[:4], -1))
  record["topk_ids"] = record["topk_ids"][:-1]
  with pytest.raises(store.CacheError, match=r"here: row 0 is damaged: .*topk_ids 779 bytes"):
    store.decode_row(record, k, "here", vocab_size=vocab, step=STEP)


def test_a_run_from_the_cache_builds_abstractly_for_an_ahead_of_time_compile(captured):
  """`program.abstract_program` of a run from the cache (what `aot.topology` compiles): no teacher, the cache's k
  from its manifest in the batch's shapes, and the step lowers on them."""
  cfg, _ = captured
  # capture.top_k says 8 here: the shapes must come from the cache (k = 16), not from the key.
  prog = program.abstract_program(load_config(**{**SETUP, "teacher.cache": cfg.capture.dir, "capture.top_k": 8}))
  assert prog.teacher_params is None and prog.lc.cached
  batch = prog.abstract_batch()
  assert batch["teacher_indices"].shape == (cfg.data.batch_size, cfg.data.seq_len, K)
  assert batch["teacher_logprobs"].dtype == np.float32
  with jax.set_mesh(prog.mesh):
    prog.train_step.lower(*prog.abstract_inputs())
