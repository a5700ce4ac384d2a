"""jaxkd's KD train step beside a DistillKit-style PyTorch step: step time and peak memory, each in its own process.

The two steps, on the same shapes, the same batch and the same objective (not the same random weights: each side
initialises its own, which does not change the work):

  jaxkd    `jaxkd.step.make_train_step` as `scripts/bench.py` builds it: student forward and backward, the teacher's
           forward under `stop_gradient`, the fused (chunked) KD + CE loss that never builds the [tokens, vocab]
           logits, AdamW with global-norm clipping; compiled once.
  PyTorch  what DistillKit's `distil_logits.py` trainer does in each step (arcee-ai/DistillKit): a Hugging Face
           `Qwen2ForCausalLM` student (built from the config, random init, SDPA attention) called with `labels`, so
           its own loss is the CE; the teacher under `torch.no_grad()`; `F.kl_div(log_softmax(s / tau),
           softmax(t / tau))` over the whole vocabulary times tau^2; loss = alpha * KD + (1 - alpha) * CE;
           `backward`, `clip_grad_norm_`, `torch.optim.AdamW`. Eager, as DistillKit runs.

Objective on both sides: alpha * tau^2 * (forward KL per trained token, averaged) + (1 - alpha) * (CE per trained
token, averaged). The batch is plain rows, one document each, as DistillKit's rows are (no packing; no padding
either, so no attention mask): random token ids, every position but a row's last trained on its next token. (DistillKit
divides its KL sum by the batch size and max_length and so also counts each row's last position; here both sides
leave that position out.) The optimizer settings are jaxkd's defaults (config_base: lr, betas, eps, weight decay on
matrices only, clip 1.0, linear warm-up then cosine decay), given to torch's AdamW and a LambdaLR.

Each side runs in a child process of its own (so neither's imports, allocator or threads touch the other), compiles
or warms up (--warmup steps), then times --steps steps; the step time is their median. Peak memory is the child's
resident-set high-water mark (`getrusage(RUSAGE_SELF).ru_maxrss`: host memory, imports included; the RSS right
after the imports is printed beside it), and on a GPU also the device's peak (`torch.cuda.max_memory_allocated`,
jax's `memory_stats()["peak_bytes_in_use"]`). After its steps each side also times the four products with the
vocabulary that any such step computes (`head_products`) on their own: on a CPU they are most of both steps, and
torch step / jaxkd's products bounds the speed-up any loss code can reach there. The jaxkd side also times the least
elementwise work the objective needs (`exp_floor`): three exp passes over every (token, column) pair, for the
student's distributions at tau and at 1 and the teacher's at tau; torch step / (products + those passes) is the
speed-up that no loss written in XLA's operations on this backend can pass. The two sides run back to back --pairs
times; every pair is a row of BENCHMARKS.md ("Against PyTorch") with the command, the commit and the machine's load.

    python scripts/bench_vs_torch.py                                   # issue 20's shapes: Qwen2 vocab, 2 x 1024 tokens
    python scripts/bench_vs_torch.py --device cuda --dtype bfloat16    # on a GPU (jax takes its default backend)
    python scripts/bench_vs_torch.py --vocab 512 --seq_len 64 --batch 2 --steps 2 --no_record   # seconds

The goal (issue 20): at Qwen2's vocabulary and 2,048 tokens, jaxkd's step at least 2x the PyTorch step's speed and at
most 1/3 of its peak memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(SCRIPTS)
GIB = 2**30
SIDES = ("jaxkd", "torch")
GOAL_SPEEDUP, GOAL_MEMORY = 2.0, 1 / 3


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  for role, hidden, layers, heads in (("student", 256, 2, 4), ("teacher", 512, 4, 8)):
    p.add_argument(f"--{role}_hidden", type=int, default=hidden)
    p.add_argument(f"--{role}_layers", type=int, default=layers)
    p.add_argument(f"--{role}_heads", type=int, default=heads)
    p.add_argument(f"--{role}_kv_heads", type=int, default=2)
    p.add_argument(f"--{role}_intermediate", type=int, default=0, help="MLP width; 0: 3 x hidden")
  p.add_argument("--tie", action="store_true", help="tie the student's head to its embedding (Qwen2-0.5B does)")
  p.add_argument("--vocab", type=int, default=151936, help="columns of both heads (Qwen2's)")
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--batch", type=int, default=2, help="rows")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="activations of both models and the teacher's weights; the student's weights stay float32 "
                      "(jaxkd's compute_dtype, torch.autocast)")
  p.add_argument("--temperature", type=float, default=None, help="default: jaxkd's (config_base)")
  p.add_argument("--alpha", type=float, default=0.5)
  p.add_argument("--chunk_size", type=int, default=0, help="jaxkd's fused-loss chunk; 0: from its byte budget")
  p.add_argument("--device", default="cpu", help="torch's device (cpu, cuda); jaxkd takes jax's default backend")
  p.add_argument("--steps", type=int, default=5, help="timed steps")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--pairs", type=int, default=2, help="times both sides run, back to back")
  p.add_argument("--no_record", action="store_true", help="print only; do not append to BENCHMARKS.md")
  p.add_argument("--benchmarks", default=os.path.join(ROOT, "BENCHMARKS.md"))
  p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # a child: run one side of --spec
  p.add_argument("--spec", help=argparse.SUPPRESS)
  return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# What both sides run: one spec, made by the parent and handed to each child as JSON.


def hf_config(args, role: str) -> dict:
  """A Qwen2 config.json dict: transformers builds the torch model from it, jaxkd's port the other."""
  hidden = getattr(args, f"{role}_hidden")
  return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu",
          "hidden_size": hidden, "intermediate_size": getattr(args, f"{role}_intermediate") or 3 * hidden,
          "num_hidden_layers": getattr(args, f"{role}_layers"), "num_attention_heads": getattr(args, f"{role}_heads"),
          "num_key_value_heads": getattr(args, f"{role}_kv_heads"), "vocab_size": args.vocab,
          "tie_word_embeddings": bool(args.tie and role == "student"),
          "max_position_embeddings": max(args.seq_len, 2048),
          "rms_norm_eps": 1e-6, "rope_theta": 1e6, "use_sliding_window": False, "attention_dropout": 0.0,
          "initializer_range": 0.02}


def make_spec(args) -> dict:
  from jaxkd import config_base  # the parent's only jaxkd import: defaults, no device touched

  base = config_base.base_config()
  opt = {k: base.optimizer[k] for k in ("lr", "warmup_steps", "min_lr_ratio", "weight_decay", "b1", "b2", "eps",
                                        "clip_norm", "schedule")}
  if opt["schedule"] != "cosine":
    raise SystemExit(f"jaxkd's default optimizer.schedule is {opt['schedule']!r}; the torch side mirrors cosine only")
  temperature = base.distill.temperature if args.temperature is None else args.temperature
  return {"student": hf_config(args, "student"), "teacher": hf_config(args, "teacher"), "batch": args.batch,
          "seq_len": args.seq_len, "dtype": args.dtype, "temperature": temperature, "alpha": args.alpha,
          "kind": base.distill.kind, "chunk_size": args.chunk_size, "device": args.device, "steps": args.steps,
          "warmup": args.warmup, "optimizer": opt, "total_steps": 1000}


def plain_batch(spec: dict, seed: int = 0) -> dict:
  """Rows of one document each, no padding: every position but a row's last is trained on its next token."""
  rows, seq_len = spec["batch"], spec["seq_len"]
  ids = np.random.RandomState(seed).randint(0, spec["student"]["vocab_size"], (rows, seq_len)).astype(np.int32)
  mask = np.ones((rows, seq_len), np.float32)
  mask[:, -1] = 0.0
  return {"input_ids": ids, "targets": np.roll(ids, -1, axis=1), "loss_mask": mask,
          "segment_ids": np.ones((rows, seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy()}


def rss_gib() -> float:
  """The process's resident set now (VmRSS), GiB."""
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 2**20


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def head_products(spec: dict) -> list[tuple[int, int, int]]:
  """(m, k, n) of the output heads' matrix products in one step, which both sides must compute whatever else they
  do: the student's logits [N, Ds] @ [Ds, V], their backward products d(hidden) = dz @ W^T ([N, V] @ [V, Ds]) and
  d(W) = h^T @ dz ([Ds, N] @ [N, V]), and the teacher's logits [N, Dt] @ [Dt, V]. At Qwen2's vocabulary they are
  most of the step's arithmetic."""
  n, v = spec["batch"] * spec["seq_len"], spec["student"]["vocab_size"]
  ds, dt = spec["student"]["hidden_size"], spec["teacher"]["hidden_size"]
  return [(n, ds, v), (n, v, ds), (ds, n, v), (n, dt, v)]


def exp_floor(exp_chunk_s: float, spec: dict, chunk: int) -> float:
  """Seconds of the objective's least elementwise work from the time of one exp over a [chunk, V] float32 array.

  The value and gradient of alpha * tau^2 * KL(p_T^tau || p_S^tau) + (1 - alpha) * CE need exp of the student's
  logits at tau and at 1 and of the teacher's at tau over every (token, column) pair, whatever the code: three
  passes over the [N, V] logits, before any max, sum, log or write of a gradient. (With alpha = 0 or 1 it is less.)
  """
  return 3 * exp_chunk_s * spec["batch"] * spec["seq_len"] / chunk


def best_of(fn, repeats: int = 3) -> float:
  """The least wall time of `repeats` calls after one warm-up (fn waits for its result)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


# ----------------------------------------------------------------------------------------------------
# The jaxkd side (imports jax only here: the torch child never loads it).


def run_jaxkd(spec: dict) -> dict:
  import jax
  import jax.numpy as jnp

  sys.path.insert(0, SCRIPTS)
  import bench  # the sibling script: models, state and step as the trainer builds them
  from jaxkd import fused_loss
  from jaxkd import sharding as shd
  from jaxkd.models import config_from_hf

  after_import = rss_gib()
  dt = spec["dtype"]
  args = bench.parse_args(["--seq_len", str(spec["seq_len"]), "--batch", str(spec["batch"]), "--param_dtype",
                           "float32", "--compute_dtype", dt, "--teacher_dtype", dt, "--alpha", str(spec["alpha"]),
                           "--temperature", str(spec["temperature"]), "--kind", spec["kind"],
                           "--chunk_size", str(spec["chunk_size"])])
  device = jax.devices()[0]  # one device, as the torch side has (and whatever XLA_FLAGS simulate)
  mesh = shd.make_mesh([1, 1, 1], devices=[device])
  s_cfg, t_cfg = config_from_hf(spec["student"]), config_from_hf(spec["teacher"])
  batch = plain_batch(spec)
  fn, state, t_params, batch, lc = bench.build(args, mesh, alpha=args.alpha, s_cfg=s_cfg, t_cfg=t_cfg, batch=batch)
  with jax.set_mesh(mesh):
    chunk = lc.chunk_size or fused_loss.chunk_for(s_cfg.vocab_size, lc.chunk_budget)
  chunk = min(chunk, batch["input_ids"].size)  # what the fused loss takes: never more than the tokens
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
  runner = bench.Runner(fn, state, t_params, batch, mesh, warmup=spec["warmup"])
  cpu = []
  for _ in range(spec["steps"]):
    start = time.process_time()
    runner.step()
    cpu.append(time.process_time() - start)
  res = runner.result()
  stats = device.memory_stats() or {}
  peak = peak_rss_gib()  # before the products below allocate their operands

  # The heads' products alone, in the step's compute dtype with float32 results as the fused loss takes them.
  compute = jnp.dtype(dt)
  matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  matmul_s = 0.0
  for m, k, n in head_products(spec):
    a = jax.device_put(jnp.ones((m, k), compute), device)
    b = jax.device_put(jnp.ones((k, n), compute), device)
    matmul_s += best_of(lambda: matmul(a, b).block_until_ready())  # noqa: B023
    del a, b
  logits = jax.device_put(jnp.ones((chunk, spec["student"]["vocab_size"]), jnp.float32), device)
  exp = jax.jit(jnp.exp)
  exp_s = exp_floor(best_of(lambda: exp(logits).block_until_ready()), spec, chunk)
  del logits
  return {"step_s": res["step_s"], "step_min_s": res["step_min_s"], "cpu_s": statistics.median(cpu),
          "loss": res["loss"], "warmup_s": res["lower_s"] + res["compile_s"], "rss_after_import_gib": after_import,
          "peak_rss_gib": peak, "matmul_s": matmul_s, "exp_s": exp_s,
          "device_peak_gib": stats["peak_bytes_in_use"] / GIB if "peak_bytes_in_use" in stats else None,
          "student_params": count(runner.state.params["student"]), "teacher_params": count(t_params),
          "batch_shape": list(batch["input_ids"].shape), "chunk": chunk,
          "device": f"jax {jax.__version__} on " + (f"CPU ({os.cpu_count()} cores)" if device.platform == "cpu" else
                                                    device.device_kind)}


# ----------------------------------------------------------------------------------------------------
# The PyTorch side, DistillKit's step (imports torch only here).


def run_torch(spec: dict) -> dict:
  import torch
  import torch.nn.functional as F
  import transformers

  after_import = rss_gib()
  torch.manual_seed(0)
  device = torch.device(spec["device"])
  half = spec["dtype"] == "bfloat16"
  student = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**spec["student"])).to(device)
  teacher = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**spec["teacher"]))
  teacher = teacher.to(device, torch.bfloat16 if half else torch.float32).eval().requires_grad_(False)
  student.train()

  o = spec["optimizer"]  # jaxkd's optim.make_optimizer: decay on matrices only, then warm-up and cosine decay
  params = [p for p in student.parameters() if p.requires_grad]
  groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o["weight_decay"]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=o["lr"], betas=(o["b1"], o["b2"]), eps=o["eps"])

  def lr_factor(step):
    if step < o["warmup_steps"]:
      return step / o["warmup_steps"]
    frac = min(1.0, (step - o["warmup_steps"]) / max(1, spec["total_steps"] - o["warmup_steps"]))
    return o["min_lr_ratio"] + (1 - o["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * frac))

  sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
  batch = plain_batch(spec)
  ids = torch.from_numpy(batch["input_ids"]).long().to(device)
  labels = ids.clone()  # HF shifts them: position t learns ids[t + 1]; a row's last position has no target
  tau, alpha = spec["temperature"], spec["alpha"]
  autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=half)
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

  def step():
    with autocast:
      out = student(input_ids=ids, labels=labels)  # out.loss: HF's CE, DistillKit's "original_loss"
      with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    s_BxTxV, t_BxTxV = out.logits[:, :-1].float(), t_logits[:, :-1].float()  # the trained positions
    kd = F.kl_div(F.log_softmax(s_BxTxV / tau, dim=-1), F.softmax(t_BxTxV / tau, dim=-1), reduction="sum")
    kd = kd * tau**2 / (s_BxTxV.shape[0] * s_BxTxV.shape[1])
    loss = alpha * kd + (1 - alpha) * out.loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, o["clip_norm"])
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  t0 = time.perf_counter()
  for _ in range(spec["warmup"]):
    step()
  sync()
  warmup_s, times, cpu = time.perf_counter() - t0, [], []
  for _ in range(spec["steps"]):
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = float(step())  # .item() waits for the device
    sync()
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - cpu_start)
  if not math.isfinite(loss):
    raise SystemExit(f"the torch step produced a non-finite loss {loss}")
  name = (torch.cuda.get_device_name(device) if device.type == "cuda" else
          f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
  peak = peak_rss_gib()  # before the products below allocate their operands
  device_peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
  matmul_s = 0.0
  for m, k, n in head_products(spec):  # in autocast's dtype, as the models' heads run
    a, b = torch.ones(m, k, device=device), torch.ones(k, n, device=device)
    with autocast:
      matmul_s += best_of(lambda: (a @ b, sync()))  # noqa: B023
    del a, b
  unique = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731  (a tied head counts once)
  return {"step_s": statistics.median(times), "step_min_s": min(times), "cpu_s": statistics.median(cpu), "loss": loss,
          "warmup_s": warmup_s,
          "rss_after_import_gib": after_import, "peak_rss_gib": peak, "matmul_s": matmul_s,
          "device_peak_gib": device_peak,
          "student_params": unique(student), "teacher_params": unique(teacher), "batch_shape": list(ids.shape),
          "device": f"torch {torch.__version__} on {name}"}


# ----------------------------------------------------------------------------------------------------
# The parent: children, ratios, rows.

RESULT = "RESULT "  # a child's last stdout line: RESULT {json}


def run_child(side: str, spec: dict) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--spec", json.dumps(spec)]
  out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)  # stderr (warnings) passes through
  lines = out.stdout.splitlines()
  if out.returncode != 0 or not lines or not lines[-1].startswith(RESULT):
    why = " (killed: out of memory? the PyTorch step holds several [tokens, vocab] float32 arrays)" * (
        out.returncode == -9)
    raise SystemExit(f"the {side} side failed (exit {out.returncode}){why}:\n" + "\n".join(lines[-30:]))
  return json.loads(lines[-1][len(RESULT):])


def shapes(r: dict) -> str:
  return (f"student {r['student_params']:,} parameters, teacher {r['teacher_params']:,}, batch "
          f"{' x '.join(map(str, r['batch_shape']))} tokens")


def check_same_shapes(res: dict) -> None:
  got = {side: shapes(r) for side, r in res.items()}
  if len(set(got.values())) != 1:
    raise SystemExit(f"the two sides ran different models or batches: {got}; jaxkd's Qwen2 port and transformers' "
                     "disagree at these shapes")


def describe(args) -> str:
  """The command, with the flags that are not at their defaults (the ones that change what is measured)."""
  defaults = vars(parse_args([]))
  return "python scripts/bench_vs_torch.py" + "".join(
      f" --{k}" if isinstance(v, bool) else f" --{k} {v}" for k, v in vars(args).items()
      if k not in ("no_record", "benchmarks", "side", "spec", "pairs") and v != defaults[k])


PREAMBLE = """
`python scripts/bench_vs_torch.py FLAGS` (its docstring has the details): jaxkd's KD train step against a
DistillKit-style PyTorch step (Hugging Face Qwen2 student called with labels, teacher under no_grad, full-vocabulary
KL at temperature tau times tau^2 plus CE, AdamW, eager), the same Qwen2 shapes, batch (plain rows, one document
each, no padding) and objective, each side in its own process, run back to back; one row per pair. Step: median over
the timed steps after warm-up. Peak RSS: the process's resident high-water mark (getrusage ru_maxrss; host memory,
imports included). Device peak: torch.cuda.max_memory_allocated and jax's peak_bytes_in_use (GPU only). Speed-up =
torch step / jaxkd step (goal >= 2), and the same in process CPU time per step (user + system, median; less
sensitive to other jobs on a shared CPU); memory ratio = jaxkd peak / torch peak (goal <= 0.33). Load: the 1-minute load
average before and after the pair (a shared CPU). Head products: the four matrix products with the vocabulary that
any such step computes (the student's logits and their two backward products, the teacher's logits), timed alone on
each side in its compute dtype after the steps; bound = torch step / jaxkd's head products, the speed-up jaxkd would
reach if everything else in its step took no time. Exp floor: three float32 exp passes over every (token, column)
pair in XLA (jax.jit(jnp.exp) on one [chunk, V] array, scaled to the tokens), the least elementwise work the
objective's value and gradient need (the student's distributions at tau and at 1, the teacher's at tau; no max, sum,
log or gradient write counted); floor bound = torch step / (jaxkd's head products + exp floor), the speed-up no loss
written in XLA's operations can pass on that backend.
"""

HEADER = ["date", "commit", "hardware", "config", "load", "jaxkd step s", "torch step s", "speed-up",
          "CPU-time speed-up", "head products s jaxkd / torch", "bound", "exp floor s", "floor bound",
          "jaxkd peak RSS GiB", "torch peak RSS GiB", "RSS ratio", "device peak GiB jaxkd / torch", "device ratio"]


def main(argv=None):
  args = parse_args(argv)
  if args.side:  # a child: one side, its result on the last line
    spec = json.loads(args.spec)
    res = (run_jaxkd if args.side == "jaxkd" else run_torch)(spec)
    print(RESULT + json.dumps(res), flush=True)
    return res

  sys.path.insert(0, SCRIPTS)
  import bench  # commit() and append_row(); imports jax but starts no backend here (the children own the devices)

  spec = make_spec(args)
  command = describe(args)
  print(f"# {command}\n# {args.pairs} pair(s) of {' then '.join(SIDES)}; the same shapes and objective on both sides, "
        "not the same random weights", flush=True)
  pairs = []
  for pair in range(1, args.pairs + 1):
    load_before = os.getloadavg()[0]
    res = {}
    for side in SIDES:  # each printed as it ends: a side that fails (out of memory) leaves the other's figures
      r = res[side] = run_child(side, spec)
      dev = "" if r["device_peak_gib"] is None else f"; device peak {r['device_peak_gib']:.3f} GiB"
      chunk = f", fused-loss chunk {r['chunk']} tokens" if "chunk" in r else ""
      exps = f"; exp floor {r['exp_s']:.4g} s" if "exp_s" in r else ""
      print(f"{side}: {r['device']}{chunk}; {shapes(r)}; step {r['step_s']:.4g} s (median of {args.steps} after "
            f"{args.warmup} warm-up, which took {r['warmup_s']:.1f} s; min {r['step_min_s']:.4g}; CPU time "
            f"{r['cpu_s']:.4g} s); head products {r['matmul_s']:.4g} s{exps}; peak RSS {r['peak_rss_gib']:.3f} GiB ({r['rss_after_import_gib']:.3f} after "
            f"imports){dev}; loss {r['loss']:.4f}", flush=True)
    load_after = os.getloadavg()[0]
    check_same_shapes(res)
    j, t = res["jaxkd"], res["torch"]
    speedup, rss_ratio = t["step_s"] / j["step_s"], j["peak_rss_gib"] / t["peak_rss_gib"]
    dev_ratio = (None if j["device_peak_gib"] is None or t["device_peak_gib"] is None else
                 j["device_peak_gib"] / t["device_peak_gib"])
    dev_text = ("" if dev_ratio is None else f"; device peak ratio {dev_ratio:.3f} (jaxkd {j['device_peak_gib']:.3f} "
                f"GiB / torch {t['device_peak_gib']:.3f} GiB)")
    cpu_speedup = t["cpu_s"] / j["cpu_s"]  # on a loaded machine, less noisy than the wall time
    bound = t["step_s"] / j["matmul_s"]  # were all but jaxkd's head products free
    floor_bound = t["step_s"] / (j["matmul_s"] + j["exp_s"])  # ... and the three exp passes of the objective
    print(f"pair {pair} (load {load_before:.1f} -> {load_after:.1f}): speed-up {speedup:.3f}x "
          f"(torch {t['step_s']:.4g} s / jaxkd {j['step_s']:.4g} s; in CPU time {cpu_speedup:.3f}x; at most "
          f"{bound:.3f}x with jaxkd's head products alone, {j['matmul_s']:.4g} s against torch's {t['matmul_s']:.4g}; at "
          f"most {floor_bound:.3f}x with those and the exp floor, {j['exp_s']:.4g} s); "
          f"peak RSS ratio {rss_ratio:.3f} (jaxkd {j['peak_rss_gib']:.3f} GiB / torch {t['peak_rss_gib']:.3f} GiB)"
          f"{dev_text}", flush=True)
    # On a GPU the memory that limits a run is the device's; on a CPU it is the host's.
    pairs.append({"speedup": speedup, "memory_ratio": rss_ratio if dev_ratio is None else dev_ratio,
                  "rss_ratio": rss_ratio, "device_ratio": dev_ratio, **res})
    if not args.no_record:
      devs = ("—" if dev_ratio is None else f"{j['device_peak_gib']:.2f} / {t['device_peak_gib']:.2f}")
      bench.append_row(args.benchmarks, "Against PyTorch (a DistillKit-style step)", PREAMBLE, HEADER, [
          datetime.date.today().isoformat(), bench.commit(), f"{j['device']}; {t['device']}",
          f"`{command}`: {shapes(j)}, jaxkd chunk {j['chunk']}", f"{load_before:.1f} -> {load_after:.1f}",
          f"{j['step_s']:.4f}", f"{t['step_s']:.4f}", f"{speedup:.2f}x", f"{cpu_speedup:.2f}x",
          f"{j['matmul_s']:.3g} / {t['matmul_s']:.3g}", f"{bound:.2f}x", f"{j['exp_s']:.3g}", f"{floor_bound:.2f}x",
          f"{j['peak_rss_gib']:.2f}", f"{t['peak_rss_gib']:.2f}", f"{rss_ratio:.2f}", devs,
          "—" if dev_ratio is None else f"{dev_ratio:.2f}"])
  met = lambda ok: f"in {sum(ok)} of {len(ok)} pair(s)"  # noqa: E731
  which = "device" if pairs[0]["device_ratio"] is not None else "peak RSS"
  print(f"goal (speed-up >= {GOAL_SPEEDUP:g}, {which} ratio <= {GOAL_MEMORY:.3f}): speed met "
        f"{met([p['speedup'] >= GOAL_SPEEDUP for p in pairs])}, memory met "
        f"{met([p['memory_ratio'] <= GOAL_MEMORY for p in pairs])}", flush=True)
  return pairs


if __name__ == "__main__":
  main()
