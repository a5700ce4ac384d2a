"""Two processes with two CPU devices each (jax.distributed on 127.0.0.1) train the tiny config through a
death, a preemption and two resumes, and reach the result of one process with four devices.

The single process reads the data as two processes would (debug.data_processes=2), so both runs see the
same global batches; they then differ only in how the four devices sum across processes (gloo over TCP
against in-process), which moves the last bits of a float32: the comparison allows 1e-5 relative.
"""

import os
import re
import signal
import time

import numpy as np
from safetensors.numpy import load_file

from tests import runs

HEARTBEAT_S = 10
RUN = {"steps": 12, "checkpoint_every": 3, "export.dtype": "float32", "progress": False,
       "distributed.heartbeat_timeout_s": HEARTBEAT_S}
KEYS = ("loss", "kd", "ce", "grad_norm", "lr", "tokens", "accuracy")


def _env(devices: int) -> dict:
  flags = [f for f in runs.ENV.get("XLA_FLAGS", "").split() if "device_count" not in f]
  return {**runs.ENV, "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])}


def _start_pair(workdir, tmp_path, tag, **extra):
  port = runs.free_port()
  return [runs.Proc(runs.command(workdir, **RUN, **extra, **{"distributed.coordinator": f"127.0.0.1:{port}",
                                                             "distributed.num_processes": 2,
                                                             "distributed.process_id": i}),
                    str(tmp_path / f"{tag}-p{i}.txt"), env=_env(2)) for i in range(2)]


def _saved_step(proc) -> int:
  found = re.findall(r"preempted: saved checkpoint step (\d+)", proc.output())
  assert len(found) == 1, proc.tail()
  return int(found[0])


def test_two_processes_match_one_through_a_death_and_a_preemption(tmp_path):
  workdir, refdir = str(tmp_path / "run"), str(tmp_path / "ref")
  # The reference runs alongside the two-process runs (it needs none of their results).
  ref = runs.Proc(runs.command(refdir, **RUN, **{"debug.data_processes": 2}), str(tmp_path / "ref.txt"),
                  env=_env(4))

  # 1. Process 1 dies (kill -9) after checkpoint 3: process 0 must not hang, it exits non-zero well within
  #    the heartbeat timeout (a collective fails at once, or JAX aborts it when the heartbeats stop).
  p0, p1 = _start_pair(workdir, tmp_path, "death")
  p0.wait_for(lambda: 3 in runs.finished_steps(workdir) and runs.last_step(workdir) >= 4, "checkpoint 3, step 4")
  p1.kill()
  killed = time.time()
  rc = p0.wait(timeout=HEARTBEAT_S + 120)
  waited = time.time() - killed
  assert rc != 0, p0.tail()
  assert waited < HEARTBEAT_S + 30, (waited, p0.tail())

  # 2. Both resume from 3; SIGTERM reaches process 1 only, as soon as process 0 has restored (while the step
  #    compiles: the start-up window, where a sync point keyed on the global step was never reached and the
  #    run went on to exit 0). JAX's preemption sync point tells both to save the same step; both exit with
  #    75. The steps are slowed (a test hook, outside the run's identity) so that a notice that travels late
  #    through the coordination service still lands before step 12 on a fast, warm machine.
  p0, p1 = _start_pair(workdir, tmp_path, "preempt", **{"debug.step_delay_s": 0.5})
  p0.wait_for(lambda: "resuming from step 3" in p0.output(), "the resume from step 3")
  p1.signal(signal.SIGTERM)
  assert p1.wait() == 75, p1.tail()
  assert p0.wait() == 75, p0.tail()
  saved = _saved_step(p0)
  assert _saved_step(p1) == saved and saved in runs.finished_steps(workdir) and saved < RUN["steps"]

  # 3. Both resume and finish.
  p0, p1 = _start_pair(workdir, tmp_path, "finish")
  assert p0.wait() == 0, p0.tail()
  assert p1.wait() == 0, p1.tail()
  for p in (p0, p1):
    assert f"resuming from step {saved}" in p.output()
  assert ref.wait() == 0, ref.tail()

  got, want = runs.metric_rows(workdir), runs.metric_rows(refdir)
  assert [(r["step"], "loss" in r) for r in got] == [(r["step"], "loss" in r) for r in want]
  for a, b in zip(got, want):
    for key in (KEYS if "loss" in a else [k for k in b if k.startswith("eval_")]):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=f"step {a['step']} {key}")
  exported, expected = (load_file(os.path.join(d, "export", "model.safetensors")) for d in (workdir, refdir))
  assert sorted(exported) == sorted(expected)
  for name in expected:
    np.testing.assert_allclose(exported[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_two_processes_capture_their_own_shards(tmp_path):
  """`python -m jaxkd.capture` on two processes: the teacher runs sharded over both, each writes its own rows
  (its share of the data, as its data loader reads it) into its own shards, and the cache holds every row once."""
  from jaxkd import data, program, step, teacher_cache  # pylint: disable=import-outside-toplevel
  cache = str(tmp_path / "cache")
  port = runs.free_port()
  procs = []
  for i in range(2):
    cmd = runs.command(str(tmp_path / "run"), **{"steps": 4, "capture.shard_batches": 2, "capture.top_k": 8,
                                                 "capture.dir": cache, "progress": False,
                                                 "distributed.coordinator": f"127.0.0.1:{port}",
                                                 "distributed.num_processes": 2, "distributed.process_id": i})
    cmd[cmd.index("jaxkd.train")] = "jaxkd.capture"
    procs.append(runs.Proc(cmd, str(tmp_path / f"capture-p{i}.txt"), env=_env(2)))
  for p in procs:
    assert p.wait() == 0, p.tail()
  assert sorted(f for f in os.listdir(cache) if f.endswith(".parquet")) == [
      f"shard-0000{p}-0000{s}.parquet" for p in range(2) for s in range(2)]
  rows = teacher_cache.open(cache)
  assert len(rows) == 32 and rows.manifest["processes"] == 2 and rows.manifest["complete"]
  cfg = runs.load_config(**{"steps": 4})
  tokenizer = program.load_tokenizers(cfg, step.loss_config(cfg)).student  # the run's
  for p in range(2):  # process p's rows of batch b are rows b * 8 + p * 4 + [0, 4), as its loader reads them
    loader = data.make_loader(cfg.data, tokenizer=tokenizer,
                              seq_len=cfg.data.seq_len, batch_size=8, seed=cfg.seed, process_index=p,
                              process_count=2, cache_dir=str(tmp_path / "data_cache"))
    for b in range(4):
      want = next(loader)["input_ids"]
      got = np.stack([rows[b * 8 + p * 4 + i]["input_ids"] for i in range(4)])
      np.testing.assert_array_equal(got, want)
    loader.close()
