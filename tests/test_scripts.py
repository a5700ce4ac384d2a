"""The scripts a user runs (benchmark, KD-vs-SFT experiment, plots), on tiny settings, so they cannot rot.

Their real figures are in BENCHMARKS.md; here only that they run and write what they say they write.
"""

import json
import os
import re
import shutil
import subprocess
import sys

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
