"""The scripts a user runs (benchmark, KD-vs-SFT experiment, plots), on tiny settings, so they cannot rot.

Their real figures are in BENCHMARKS.md; here only that they run and write what they say they write.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np

from tests.runs import ROOT


def _script(name, *args, timeout=600):
  out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  return out.stdout


def test_bench_appends_a_train_step_row(tmp_path):
  bench = str(tmp_path / "BENCHMARKS.md")
  shutil.copy(os.path.join(ROOT, "BENCHMARKS.md"), bench)
  before = open(bench).read()
  out = _script("bench.py", "--student", "tiny", "--teacher", "tiny", "--seq_len", 64, "--batch", 8, "--steps", 2,
                "--warmup", 1, "--compute_dtype", "float32", "--teacher_dtype", "float32", "--benchmarks", bench)
  assert "tokens/s" in out
  after = open(bench).read()
  added = [l for l in after.splitlines() if l not in before.splitlines()]
  assert len(added) == 1 and added[0].startswith("| ") and "--seq_len 64" in added[0], added
  section = after[after.index("## Train step"):]
  assert added[0] in section  # in the train-step table, not elsewhere
  # The throughput is the batch's 8 x 64 positions over the step time, printed and recorded alike.
  step_s, tokens_s = re.search(r"; step ([0-9.]+) s \(median of 2.*?; (\d+) tokens/s;", out).groups()
  assert abs(int(tokens_s) - 8 * 64 / float(step_s)) <= 1 + 0.01 * int(tokens_s)  # step s printed to 4 places
  cells = [c.strip() for c in added[0].strip().strip("|").split("|")]
  assert (cells[5], cells[6]) == (step_s, tokens_s), cells  # the "step s" and "tokens/s" columns


def test_kd_vs_sft_writes_report_and_plot_and_plot_runs_draws_them(tmp_path):
  workdir = str(tmp_path / "kvs")
  out = _script("kd_vs_sft.py", "--workdir", workdir, "--seeds", "0", "--steps", 3, "--modes",
                "logit_kd,offline_kd,on_policy_kd", "--answer_points", 1, "--answers_limit", 8)
  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  # The verdict, in the report and printed, is the one the per-seed held-out losses give.
  loss = {mode: report[mode]["per_seed"]["0"]["eval_loss"] for mode in ("sft", "logit_kd", "offline_kd")}
  for mode, name in (("logit_kd", "logit KD"), ("offline_kd", "offline logit KD")):
    beats = loss[mode] < loss["sft"]
    assert report[f"{mode}_beats_sft_every_seed"] == beats
    verdict = (f"{name} beats SFT on held-out loss for every seed" if beats else
               f"{name} does not beat SFT on held-out loss for seed(s) 0")
    assert verdict in out.splitlines(), out[-2000:]
  assert "hidden_kd" not in report  # not asked for (the full run: BENCHMARKS.md)
  # The offline run read the cache captured for its seed: 3 steps x 8 rows, top 64, and no teacher model.
  cache = os.path.join(workdir, "capture-seed0")
  manifest = json.load(open(os.path.join(cache, "manifest.json")))
  assert (manifest["rows"], manifest["k"], manifest["complete"]) == (24, 64, True)
  assert json.load(open(os.path.join(workdir, "offline_kd-seed0", "config.json")))["teacher"]["cache"] == cache
  assert report["offline_kd"]["tokens_per_s"] > 0 and report["logit_kd"]["tokens_per_s"] > 0
  for mode in ("teacher", "sft", "logit_kd", "offline_kd", "on_policy_kd"):
    assert {"eval_loss", "eval_accuracy", "answers"} <= set(report[mode]), mode
    assert f"{mode:>13}: held-out loss {report[mode]['eval_loss']:.4f}" in out, mode  # printed as reported
    assert 0 < report[mode]["eval_loss"] < 20 and 0 <= report[mode]["eval_accuracy"] <= 1
  assert report["teacher"]["eval_loss"] < report["sft"]["eval_loss"]  # a trained teacher, 3-step students
  # The share of the first 8 held-out questions answered right, at the one checkpoint (the last step).
  assert report["teacher"]["answers"] > 0
  for mode in ("sft", "logit_kd", "offline_kd", "on_policy_kd"):
    curve = report[mode]["per_seed"]["0"]["answers_curve"]
    assert [(c["step"], c["total"]) for c in curve] == [(3, 8)] and report[mode]["answers"] == curve[0]["accuracy"]
  won = report["on_policy_kd_answers_more_than_logit_kd_seeds"]
  assert f"on_policy_kd answers more held-out questions right than logit_kd on {len(won)} of 1 seed(s)" in out
  # Function calling at the end: the first 8 turns of the held-out tool chats, 4 of them calls.
  assert report["teacher"]["function_calling"]["calls"]["total"] == 4 and report["teacher"]["function_calls"] > 0
  for mode in ("sft", "logit_kd", "offline_kd", "on_policy_kd"):
    calls = report[mode]["per_seed"]["0"]["function_calling"]
    assert (calls["total"], calls["calls"]["total"], calls["syntax"]) == (8, 4, "inline")
    assert report[mode]["function_calls"] == calls["calls"]["accuracy"]
    assert f"calls right {report[mode]['function_calls']:.4f}" in out
  won = report["logit_kd_calls_more_than_sft_seeds"]
  assert f"logit_kd makes more held-out tool calls right than sft on {len(won)} of 1 seed(s)" in out
  on_policy_rows = [json.loads(line) for line in open(os.path.join(workdir, "on_policy_kd-seed0", "metrics.jsonl"))]
  assert any("sampled_len" in r for r in on_policy_rows)  # its on-policy steps ran
  assert os.path.getsize(os.path.join(workdir, "curves.png")) > 10_000
  png = str(tmp_path / "two.png")
  _script("plot_runs.py", os.path.join(workdir, "sft-seed0"), os.path.join(workdir, "logit_kd-seed0"), "--out", png)
  assert os.path.getsize(png) > 10_000


def test_bench_compile_only_records_the_compiled_memory(tmp_path):
  bench = str(tmp_path / "BENCHMARKS.md")
  shutil.copy(os.path.join(ROOT, "BENCHMARKS.md"), bench)
  before = open(bench).read().splitlines()
  out = _script("bench.py", "--student", "tiny", "--teacher", "tiny", "--seq_len", 64, "--batch", 8, "--compile_only",
                "--benchmarks", bench)
  line = next(l for l in out.splitlines() if l.startswith("compile only"))
  figures = dict(re.findall(r"(arguments|outputs|donated|temporaries|total) ([0-9.e+-]+)", line))
  args, outs, donated, temp, total = (float(figures[k]) for k in
                                      ("arguments", "outputs", "donated", "temporaries", "total"))
  assert args > 0 and temp > 0 and 0 < donated <= outs  # the student's state is donated to the step
  assert abs(total - (args + outs - donated + temp)) <= 1e-2 * total  # printed to 3 digits
  after = open(bench).read()
  added = [l for l in after.splitlines() if l not in before and l.startswith("| 2")]  # rows start with the date
  assert len(added) == 1 and "--seq_len 64" in added[0], added
  assert added[0] in after[after.index("## Compiled step memory (compile only)"):]


def test_bench_loss_memory_counts_one_trips_work_for_a_tpu_chip_and_times_the_loss_here():
  """scripts/bench_loss_memory.py on tiny heads: for one v5p chip (compiled on libtpu's compile-only devices), one
  trip's transcendentals and bytes per (token, column); the monitoring sums (--metrics) add work to a trip, and the
  heads' weights, read again every trip, make a small chunk's bytes per entry larger. Here it also runs the loss."""
  tiny = ["--tokens", 128, "--student_width", 32, "--teacher_width", 64, "--vocab", 1024, "--vocab_size", 1000,
          "--temperature", 2, "--chunk_size", "16,64"]

  def trips(*extra):
    out = _script("bench_loss_memory.py", *tiny, *extra)
    found = re.findall(r"one trip of chunk (\d+) .*: ([0-9.]+) transcendentals and ([0-9.]+) bytes accessed", out)
    return out, {int(c): (float(t), float(b)) for c, t, b in found}

  out, metrics = trips("--metrics", "--tpu", "v5p-8")
  assert "one chip of TPU v5p-8" in out and set(metrics) == {16, 64}
  _, plain = trips("--tpu", "v5p-8")
  assert metrics[16][0] > plain[16][0] > 0 and metrics[16][1] > plain[16][1]
  assert metrics[16][1] > metrics[64][1]
  out, _ = trips("--metrics", "--time", 1)
  assert re.search(r"^\| 128 \| 64 \| 2 \| [0-9.]+ \| \d+ \|", out, re.M), out
  refused = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_loss_memory.py"), "--tpu", "v5p-8",
                            "--time", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert refused.returncode != 0 and "--tpu only compiles" in refused.stderr


def test_bench_refuses_teacher_cost_with_compile_only():
  out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--teacher_cost", "--compile_only",
                        "--no_record"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "use one of them" in out.stderr


def test_gpu_check_script_runs_a_stage_and_rejects_an_unknown_one(tmp_path):
  """scripts/gpu_check.sh is run on a lent GPU; its plumbing (stages, limits, summary) is checked here."""
  env = {**os.environ, "GPU_CHECK_PLATFORM": "cpu", "OUT": str(tmp_path)}
  script = os.path.join(ROOT, "scripts", "gpu_check.sh")
  out = subprocess.run(["bash", script, "env"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  assert "env: ok" in out.stdout and "backend cpu" in out.stdout
  assert open(tmp_path / "gpu_check.log").read().count("=== env") == 1
  assert open(tmp_path / "BENCHMARKS.md").read() == open(os.path.join(ROOT, "BENCHMARKS.md")).read()
  bad = subprocess.run(["bash", script, "env", "bench2"], cwd=ROOT, env=env, capture_output=True, text=True)
  assert bad.returncode == 2 and "unknown stage 'bench2'" in bad.stderr


def _qwen2_params(d, layers, heads, kv_heads, inter, vocab, tied):
  """A Qwen2 decoder's parameter count from its config, by hand: q/k/v with bias, o, gated MLP, two norms a layer."""
  hd = d // heads
  layer = d * heads * hd + heads * hd + 2 * (d * kv_heads * hd + kv_heads * hd) + heads * hd * d + 3 * d * inter + 2 * d
  return vocab * d * (1 if tied else 2) + layers * layer + d


def test_bench_vs_torch_runs_both_sides_on_the_same_shapes_and_records_their_ratios(tmp_path):
  bench = str(tmp_path / "BENCHMARKS.md")
  shutil.copy(os.path.join(ROOT, "BENCHMARKS.md"), bench)
  before = open(bench).read().splitlines()
  vocab = 256
  out = _script("bench_vs_torch.py", "--student_hidden", 32, "--student_layers", 1, "--student_heads", 2,
                "--student_kv_heads", 1, "--student_intermediate", 64, "--tie", "--teacher_hidden", 64,
                "--teacher_layers", 1, "--teacher_heads", 4, "--vocab", vocab, "--seq_len", 32, "--batch", 2,
                "--steps", 2, "--warmup", 1, "--pairs", 1, "--benchmarks", bench)
  sides = {}
  for side in ("jaxkd", "torch"):
    line = next(l for l in out.splitlines() if l.startswith(f"{side}: "))
    student, teacher, rows, cols, step_s, cpu_s, mm_s, exp_s, rss, loss = re.search(
        r"student ([\d,]+) parameters, teacher ([\d,]+), batch (\d+) x (\d+) tokens; step ([0-9.e+-]+) s .*"
        r"CPU time ([0-9.e+-]+) s\); head products ([0-9.e+-]+) s(?:; exp floor ([0-9.e+-]+) s)?; peak RSS ([0-9.]+) "
        r"GiB .*; loss ([0-9.]+)$", line).groups()
    sides[side] = dict(step=float(step_s), cpu=float(cpu_s), mm=float(mm_s), rss=float(rss), loss=float(loss))
    assert (exp_s is not None) == (side == "jaxkd"), line  # the floor is XLA's: the jaxkd side times it
    sides[side]["exp"] = exp_s and float(exp_s)
    assert 0 < sides[side]["mm"], line
    # Both ran the models the flags describe (teacher MLP 3 x 64 by default, untied) on the 2 x 32 batch.
    assert int(student.replace(",", "")) == _qwen2_params(32, 1, 2, 1, 64, vocab, tied=True), line
    assert int(teacher.replace(",", "")) == _qwen2_params(64, 1, 4, 2, 192, vocab, tied=False), line
    assert (rows, cols) == ("2", "32"), line
    # The same objective: near-uniform random models give CE ~ ln V and a KD term near 0, mixed half and half.
    assert abs(sides[side]["loss"] - 0.5 * np.log(vocab)) < 0.01, line
  pair = next(l for l in out.splitlines() if l.startswith("pair 1 "))
  (speedup, t_s, j_s, cpu_speedup, bound, j_mm, t_mm, floor_bound, j_exp, rss_ratio, j_rss,
   t_rss) = map(float, re.search(
      r"speed-up ([0-9.]+)x \(torch ([0-9.e+-]+) s / jaxkd ([0-9.e+-]+) s; in CPU time ([0-9.]+)x; at most "
      r"([0-9.]+)x with jaxkd's head products alone, ([0-9.e+-]+) s against torch's ([0-9.e+-]+); at most "
      r"([0-9.]+)x with those and the exp floor, ([0-9.e+-]+) s\); peak RSS ratio ([0-9.]+) \(jaxkd ([0-9.]+) GiB / "
      r"torch ([0-9.]+) GiB\)", pair).groups())
  assert (j_mm, t_mm) == (sides["jaxkd"]["mm"], sides["torch"]["mm"]), pair
  assert abs(bound - t_s / j_mm) <= 5e-4 + 2e-3 * bound
  assert 0 < j_exp == sides["jaxkd"]["exp"], pair
  assert abs(floor_bound - t_s / (j_mm + j_exp)) <= 5e-4 + 2e-3 * floor_bound
  assert (j_s, t_s, j_rss, t_rss) == (sides["jaxkd"]["step"], sides["torch"]["step"], sides["jaxkd"]["rss"],
                                      sides["torch"]["rss"]), pair
  assert abs(speedup - t_s / j_s) <= 5e-4 + 2e-3 * speedup  # times printed to 4 digits, ratios to 3 places
  assert abs(cpu_speedup - sides["torch"]["cpu"] / sides["jaxkd"]["cpu"]) <= 5e-4 + 2e-3 * cpu_speedup
  assert abs(rss_ratio - j_rss / t_rss) <= 5e-4 + 2e-3 * rss_ratio
  added = [l for l in open(bench).read().splitlines() if l not in before and l.startswith("| 2")]
  assert len(added) == 1 and "--vocab 256" in added[0], added
  assert added[0] in open(bench).read()[open(bench).read().index("## Against PyTorch"):]
  cells = [c.strip() for c in added[0].strip().strip("|").split("|")]
  assert cells[7].endswith("x") and abs(float(cells[7][:-1]) - speedup) <= 0.0051, cells  # as printed, 2 places
  assert abs(float(cells[10].rstrip("x")) - bound) <= 0.0051 + 3e-3 * bound, cells
  assert abs(float(cells[12].rstrip("x")) - floor_bound) <= 0.0051 + 3e-3 * floor_bound, cells
  assert abs(float(cells[15]) - rss_ratio) <= 0.0051, cells
