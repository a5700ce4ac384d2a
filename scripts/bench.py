"""Times the KD train step on randomly initialised models and appends a row to BENCHMARKS.md.

The step is the one `jaxkd.trainer` runs (`jaxkd.step.make_train_step`: student forward and backward, the
teacher forward under `stop_gradient`, the fused KD + CE loss, AdamW), on a synthetic packed batch: each
row holds several documents (segment ids, per-document positions) and a little padding. Models are named
real configs from `jaxkd.models.presets` (random weights, nothing downloaded) or `tiny` shapes.

    python scripts/bench.py --student tiny --teacher tiny                      # a few seconds on a CPU
    python scripts/bench.py --student Qwen/Qwen2-0.5B --teacher none --seq_len 256 --batch 1
    python scripts/bench.py --student Qwen/Qwen2-1.5B --teacher Qwen/Qwen2-7B --seq_len 2048 --batch 8 \\
        --remat dots_no_batch_attention                                         # one H200
    python scripts/bench.py --student tiny --teacher tiny --teacher_cost       # alpha = 0 against alpha > 0

Reported: compile time (lower + compile, persistent cache off), step time (median over --steps after
--warmup), tokens/s (batch x seq_len, padding included), MFU and peak memory.

Model FLOPs per token = 6 N_s + 2 N_t + attention, over the device's peak (989 TFLOP/s dense bf16 for an
H100/H200, else --peak_tflops; no MFU without a peak). N is the parameters that multiply activations: every
parameter except the input embedding table (a gather, no FLOPs); a tied table counts once, as the output
head. Attention per token: 12 L T d for the student (forward + backward) and 4 L T d for the teacher
(forward), d = heads x head_dim, T = seq_len; the "MFU" column counts every (query, key) pair as PaLM does,
"MFU causal" halves attention for the causal mask (what a flash kernel actually computes; packed documents
need still less).

Peak memory: `memory_stats()["peak_bytes_in_use"]` where the device reports it (GPU, TPU); on a CPU, the
compiled step's `memory_analysis()`: arguments + outputs - aliased (donated) + temporaries.

--teacher_cost builds the step twice, with alpha = 0 (no teacher is traced: CE only) and with --alpha,
times them in turn (so both see the same machine load) and reports the teacher's share of the step time,
(t_kd - t_ce) / t_kd: the teacher forward, its head and the KD term of the fused loss. It writes a row to
the "Teacher cost" table only.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkd import checkpoint, config_base, optim, signals, step as step_lib, tiny
from jaxkd import sharding as shd
from jaxkd.models import Transformer, attention, config_from_hf, hf_io
from jaxkd.models.presets import PRESETS
from jaxkd.models.transformer import REMAT_POLICIES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, per device


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--student", default="tiny", help="preset hub id (jaxkd.models.presets), tiny or tiny:NAME")
  p.add_argument("--teacher", default="tiny", help="preset hub id, tiny, tiny:NAME or none (CE only)")
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--batch", type=int, default=8, help="rows per step (global)")
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes; one may be -1")
  p.add_argument("--remat", default="none", choices=sorted(REMAT_POLICIES))
  p.add_argument("--attention", default="auto", choices=attention.IMPLEMENTATIONS)
  p.add_argument("--param_dtype", default="float32", help="student master weights")
  p.add_argument("--compute_dtype", default="bfloat16", help="student activations")
  p.add_argument("--teacher_dtype", default="bfloat16", help="teacher parameters and activations")
  p.add_argument("--alpha", type=float, default=0.5)
  p.add_argument("--temperature", type=float, default=config_base.base_config().distill.temperature)
  p.add_argument("--kind", default="forward_kl")
  p.add_argument("--chunk_size", type=int, default=1024)
  p.add_argument("--micro_batches", type=int, default=1)
  p.add_argument("--docs_per_row", type=int, default=4)
  p.add_argument("--peak_tflops", type=float, default=None, help="per device; default 989 on H100/H200")
  p.add_argument("--teacher_cost", action="store_true", help="also time alpha = 0 and report the teacher's share")
  p.add_argument("--compile_only", action="store_true",
                 help="lower and compile on abstract inputs (nothing allocated or run) and report the compiled "
                      "step's memory: a pre-flight for shapes too big for this machine")
  p.add_argument("--no_record", action="store_true", help="print only; do not append to BENCHMARKS.md")
  p.add_argument("--benchmarks", default=os.path.join(ROOT, "BENCHMARKS.md"))
  return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# Models, state and batch.


def model_config(name: str, role: str):
  if name == "tiny":
    name = f"tiny:{role}"
  if name.startswith("tiny:"):
    key = name[len("tiny:"):]
    if key not in tiny.TINY_CONFIGS:
      raise SystemExit(f"unknown tiny model {name!r}; known: {', '.join('tiny:' + k for k in tiny.TINY_CONFIGS)}")
    return config_from_hf(tiny.TINY_CONFIGS[key])
  if name not in PRESETS:
    raise SystemExit(f"unknown model {name!r}; use tiny, tiny:NAME or one of {', '.join(PRESETS)}")
  return config_from_hf(PRESETS[name])


def init_model(cfg, mesh, *, param_dtype, dtype, remat="none", attention_impl="auto", seed=0, abstract=False):
  """(graphdef, parameters as a nested dict placed on their shardings, shardings), initialised on device.

  With `abstract`, the parameters are ShapeDtypeStructs (nothing is allocated: --compile_only).
  """
  make = lambda: Transformer(cfg, param_dtype=param_dtype, dtype=dtype, remat=remat,  # noqa: E731
                             attention=attention_impl, rngs=nnx.Rngs(seed))
  init = lambda: nnx.to_pure_dict(nnx.state(make(), nnx.Param))  # noqa: E731
  module = nnx.eval_shape(make)
  graphdef = nnx.split(module)[0]
  shardings = shd.module_shardings(mesh, module)
  if abstract:
    return graphdef, checkpoint.abstract_like(jax.eval_shape(init), shardings), shardings
  return graphdef, jax.jit(init, out_shardings=shardings)(), shardings


def matmul_params(cfg) -> int:
  """Parameters that multiply activations: all but the input embedding table (a tied one is the head)."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  return total - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size)


def flops_per_token(s_cfg, t_cfg, seq_len: int, *, causal: bool) -> dict:
  """Model FLOPs per token of the step: student forward + backward, teacher forward."""
  half = 0.5 if causal else 1.0
  attn = lambda cfg: cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim * half  # noqa: E731
  out = {"student": 6 * matmul_params(s_cfg) + 12 * attn(s_cfg), "teacher": 0.0}
  if t_cfg is not None:
    out["teacher"] = 2 * matmul_params(t_cfg) + 4 * attn(t_cfg)
  out["total"] = out["student"] + out["teacher"]
  return out


def synthetic_batch(rows: int, seq_len: int, vocab: int, docs_per_row: int, seed: int = 0) -> dict:
  """Packed rows: `docs_per_row` documents of random lengths, then up to 3% padding (segment 0)."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, vocab, (rows, seq_len)).astype(np.int32)
  seg = np.zeros((rows, seq_len), np.int32)
  pos = np.zeros((rows, seq_len), np.int32)
  mask = np.zeros((rows, seq_len), np.float32)
  for r in range(rows):
    end = seq_len - rng.randint(0, max(1, seq_len * 3 // 100) + 1)
    docs = min(docs_per_row, max(1, end // 2))
    cuts = [0, *sorted(rng.choice(np.arange(1, end), size=docs - 1, replace=False)), end]
    for d, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
      seg[r, a:b], pos[r, a:b] = d + 1, np.arange(b - a)
      mask[r, a:b - 1] = 1.0  # no target across a document's end
  targets = np.roll(ids, -1, axis=1)
  return {"input_ids": ids, "targets": targets, "loss_mask": mask, "segment_ids": seg, "positions": pos}


def build(args, mesh, *, alpha: float, s_cfg, t_cfg, abstract: bool = False, batch: dict | None = None):
  """(jitted step, state, teacher params, batch, LossConfig) as the trainer builds them.

  With `abstract`, state, teacher parameters and batch are ShapeDtypeStructs: enough to lower and compile.
  `batch` (numpy arrays, the student's keys) replaces the synthetic packed one.
  """
  pd, cd, td = (hf_io.resolve_dtype(x) for x in (args.param_dtype, args.compute_dtype, args.teacher_dtype))
  vocab = min(s_cfg.vocab_size, t_cfg.vocab_size) if t_cfg is not None else s_cfg.vocab_size
  run_cfg = config_base.base_config()  # what a run would set, but for the bench's own choices
  run_cfg.distill.alpha = alpha if t_cfg is not None else 0.0
  run_cfg.distill.kind, run_cfg.distill.chunk_size = args.kind, args.chunk_size
  run_cfg.distill.temperature = args.temperature
  run_cfg.optimizer.micro_batches = args.micro_batches
  lc = step_lib.loss_config(run_cfg, vocab_size=vocab)
  with jax.set_mesh(mesh):
    s_def, s_params, s_sh = init_model(s_cfg, mesh, param_dtype=pd, dtype=cd, remat=args.remat,
                                       attention_impl=args.attention, seed=0, abstract=abstract)
    t_def = t_params = t_sh = None
    if lc.uses_teacher:
      t_def, t_params, t_sh = init_model(t_cfg, mesh, param_dtype=td, dtype=td, attention_impl=args.attention,
                                         seed=1, abstract=abstract)
    optimizer, lr = optim.make_optimizer(run_cfg.optimizer, 1000)
    params, param_sh = {"student": s_params}, {"student": s_sh}
    opt_sh = shd.opt_state_shardings(mesh, jax.eval_shape(optimizer.init, params), param_sh)
    rep = shd.replicated(mesh)
    state_sh = step_lib.TrainState(step=rep, params=param_sh, opt_state=opt_sh)
    batch_sh = shd.batch_shardings(mesh, lc.batch_keys())
    fn = step_lib.make_train_step(s_def, signals.online(t_def), optimizer, lr, lc, state_shardings=state_sh,
                                  teacher_shardings=t_sh, batch_shardings=batch_sh)
    if batch is None:
      batch = synthetic_batch(args.batch, args.seq_len, vocab, args.docs_per_row)
    if abstract:
      state = checkpoint.abstract_like(jax.eval_shape(lambda p: step_lib.TrainState(
          step=jnp.int32(0), params=p, opt_state=optimizer.init(p)), params), state_sh)
      return fn, state, t_params, checkpoint.abstract_like(batch, batch_sh), lc
    opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
    state = step_lib.TrainState(step=jax.device_put(jnp.int32(0), rep), params=params, opt_state=opt_state)
    batch = jax.device_put(batch, batch_sh)
  return fn, state, t_params, batch, lc


# ----------------------------------------------------------------------------------------------------
# Measuring.


def peak_memory(compiled) -> tuple[float | None, str]:
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / GIB, "device peak"
  m = compiled.memory_analysis()
  if m is None:
    return None, "n/a"
  total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  return total / GIB, f"compiled: temp {m.temp_size_in_bytes / GIB:.2f}"


class Runner:
  """A compiled, warmed-up step; `step()` runs one more and returns its wall time."""

  def __init__(self, fn, state, t_params, batch, mesh, *, warmup: int):
    self.t_params, self.batch, self.mesh, self.times = t_params, batch, mesh, []
    with jax.set_mesh(mesh):
      t0 = time.perf_counter()
      lowered = fn.lower(state, t_params, batch)
      t1 = time.perf_counter()
      self.compiled = lowered.compile()
      self.lower_s, self.compile_s = t1 - t0, time.perf_counter() - t1
      for _ in range(warmup):
        state, self.metrics = self.compiled(state, t_params, batch)
      self.state = jax.block_until_ready(state)

  def step(self) -> float:
    with jax.set_mesh(self.mesh):
      start = time.perf_counter()
      self.state, self.metrics = self.compiled(self.state, self.t_params, self.batch)
      jax.block_until_ready((self.state, self.metrics))
    self.times.append(time.perf_counter() - start)
    return self.times[-1]

  def result(self) -> dict:
    mem, mem_source = peak_memory(self.compiled)
    loss = float(jax.device_get(self.metrics["loss"]))
    if not np.isfinite(loss):
      raise SystemExit(f"the step produced a non-finite loss {loss}")
    return {"lower_s": self.lower_s, "compile_s": self.compile_s, "step_s": statistics.median(self.times),
            "step_min_s": min(self.times), "mem_gib": mem, "mem_source": mem_source, "loss": loss}


# ----------------------------------------------------------------------------------------------------
# Recording.


def commit() -> str:
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!BENCHMARKS.md"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()  # rows don't count
    return head + ("+uncommitted" if dirty else "")
  except (OSError, subprocess.CalledProcessError):  # no git, or a copy of the tree without .git
    return os.environ.get("JAXKD_COMMIT", "unknown")


def hardware() -> str:
  devs = jax.devices()
  kind = devs[0].device_kind
  if devs[0].platform == "cpu":  # a shared CPU: the load at the start says how much of it the run had
    kind = f"CPU ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})"
  return f"{len(devs)} x {kind}"


def append_row(path: str, section: str, preamble: str, header: list[str], row: list[str]) -> None:
  """Appends `row` to the table of `## section` in `path`, creating the section (and file) if needed."""
  line = "| " + " | ".join(row) + " |\n"
  text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
  title = f"## {section}\n"
  if title not in text:
    table = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    text = text.rstrip("\n") + f"\n\n{title}\n{preamble.strip()}\n\n{table}{line}"
  else:
    start = text.index(title)
    nxt = text.find("\n## ", start + len(title))
    end = len(text) if nxt < 0 else nxt + 1
    lines = text[start:end].splitlines(keepends=True)
    last = max(i for i, l in enumerate(lines) if l.startswith("|"))
    lines.insert(last + 1, line)
    text = text[:start] + "".join(lines) + text[end:]
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


TRAIN_PREAMBLE = """
`python scripts/bench.py FLAGS` (a row's "config" holds its flags: the key ones and any not at their
default): the KD train step of `jaxkd.step.make_train_step` on randomly initialised models and a synthetic
packed batch (4 documents per row, up to 3% padding). Step time is the median over the timed steps after
warm-up; tokens/s counts every position of the batch (padding included); compile is lower + compile with
the persistent cache off. MFU = model FLOPs per token x tokens/s / (peak x devices); model FLOPs per
token = 6 N_s + 2 N_t + attention, N = parameters that multiply activations (all but the input embedding
table; a tied table counts once, as the output head); attention = 12 L T d (student, forward + backward)
+ 4 L T d (teacher, forward), d = heads x head_dim, T = seq_len. "MFU" counts every (query, key) pair
(PaLM); "MFU causal" halves attention. Peak 989 TFLOP/s (dense bf16) per H100/H200; no MFU on a CPU.
Memory: the device's peak where it reports one, else the compiled step's memory analysis (arguments +
outputs - donated + temporaries).
"""

TRAIN_HEADER = ["date", "commit", "hardware", "config", "compile s", "step s", "tokens/s", "TFLOP/token",
                "MFU", "MFU causal", "memory GiB"]

TEACHER_PREAMBLE = """
`python scripts/bench.py FLAGS --teacher_cost`: the same step with alpha = 0 (CE only, no teacher traced)
and with alpha > 0, both compiled first and then timed in turn (so both see the same machine load).
Teacher share = (t_kd - t_ce) / t_kd: the teacher forward, its output head and the KD term of the fused
loss. "FLOP share" is the teacher's part of the model FLOPs (2 N_t + 4 L T d against the whole step's,
attention halved for the causal mask): the share if every FLOP cost the same time.
"""

TEACHER_HEADER = ["date", "commit", "hardware", "config", "step s alpha=0", "step s alpha>0", "teacher share",
                  "FLOP share"]


KEY_FLAGS = ("student", "teacher", "seq_len", "batch")
NOT_CONFIG = ("benchmarks", "no_record", "teacher_cost", "compile_only")  # what to do, not what was run


def describe(args, choices: dict) -> str:
  """The command's flags (key ones always, others where not default), and the attention kernels that ran."""
  defaults = vars(parse_args([]))
  flags = [f"--{k} {v}" for k, v in vars(args).items()
           if k not in NOT_CONFIG and (k in KEY_FLAGS or v != defaults[k])]
  ran = {c.implementation for c in choices.values()}
  if ran == {args.attention}:
    return f"`{' '.join(flags)}`"
  which = ", ".join(f"{role} {c.implementation}" for role, c in choices.items())
  return f"`{' '.join(flags)}`; attention ran: {which}"


COMPILED_PREAMBLE = """
`python scripts/bench.py FLAGS --compile_only`: the same step lowered and compiled for the local backend on
abstract inputs (nothing is allocated or run), so shapes far too big for the machine can be checked. From
XLA's `memory_analysis()` of the compiled step: arguments (parameters, optimizer state, teacher, batch),
temporaries, and the total the step needs at once = arguments + outputs - donated (aliased) + temporaries.
On a CPU the figures are expected to be above a GPU's, not a guarantee: XLA:CPU computes bf16 dots in
float32 and keeps the activations it saves for the backward pass in float32, and its attention is the XLA
path, which builds the [B, N, T, T] scores that cuDNN's flash kernel never does.
"""

COMPILED_HEADER = ["date", "commit", "backend", "config", "compile s", "arguments GiB", "temporaries GiB",
                   "total GiB"]


def compile_only(args, mesh, s_cfg, t_cfg, config: str) -> dict:
  """Lowers and compiles the step on abstract inputs; prints (and records) its compiled memory."""
  fn, state, t_params, batch, lc = build(args, mesh, alpha=args.alpha, s_cfg=s_cfg, t_cfg=t_cfg, abstract=True)
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    compiled = fn.lower(state, t_params, batch).compile()
    compile_s = time.perf_counter() - t0
  m = compiled.memory_analysis()
  res = {"compile_s": compile_s, "arguments_gib": m.argument_size_in_bytes / GIB,
         "outputs_gib": m.output_size_in_bytes / GIB, "aliased_gib": m.alias_size_in_bytes / GIB,
         "temp_gib": m.temp_size_in_bytes / GIB}
  res["total_gib"] = res["arguments_gib"] + res["outputs_gib"] - res["aliased_gib"] + res["temp_gib"]
  fl = flops_per_token(s_cfg, t_cfg if lc.uses_teacher else None, args.seq_len, causal=False)
  print(f"compile only ({jax.default_backend()}): lower + compile {compile_s:.1f} s; arguments "
        f"{res['arguments_gib']:.3g} GiB, outputs {res['outputs_gib']:.3g}, donated {res['aliased_gib']:.3g}, "
        f"temporaries {res['temp_gib']:.3g}; total {res['total_gib']:.3g} GiB per device; "
        f"{fl['total'] / 1e12:.4g} TFLOP/token", flush=True)
  if not args.no_record:
    append_row(args.benchmarks, "Compiled step memory (compile only)", COMPILED_PREAMBLE, COMPILED_HEADER,
               [datetime.date.today().isoformat(), commit(), f"{len(jax.devices())} x {jax.default_backend()}",
                config, f"{compile_s:.1f}", f"{res['arguments_gib']:.2f}", f"{res['temp_gib']:.2f}",
                f"{res['total_gib']:.2f}"])
  return res


def main(argv=None):
  args = parse_args(argv)
  jax.config.update("jax_enable_compilation_cache", False)  # compile time means compiling
  mesh = shd.make_mesh([int(x) for x in args.mesh.split(",")])
  problem = shd.batch_problem(mesh, args.batch, "--batch", "use another --mesh")
  if problem:
    raise SystemExit(problem)
  s_cfg = model_config(args.student, "student")
  t_cfg = None if args.teacher == "none" else model_config(args.teacher, "teacher")
  choices = {role: attention.implementation_for(args.attention, dtype=hf_io.resolve_dtype(dtype),
                                                head_dim=cfg.head_dim, q_len=args.seq_len, kv_len=args.seq_len)
             for role, cfg, dtype in (("student", s_cfg, args.compute_dtype), ("teacher", t_cfg, args.teacher_dtype))
             if cfg is not None}
  kind = jax.devices()[0].device_kind
  peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
  config = describe(args, choices)
  if args.teacher_cost and t_cfg is None:
    raise SystemExit("--teacher_cost needs a --teacher")
  if args.teacher_cost and args.compile_only:
    raise SystemExit("--teacher_cost times steps; --compile_only runs none: use one of them")
  print(f"# {' '.join(shlex.quote(a) for a in sys.argv)}\n# {hardware()}; {config}", flush=True)

  if args.compile_only:
    return compile_only(args, mesh, s_cfg, t_cfg, config)

  # With --teacher_cost both steps are built first and then timed in turn, so both see the same load.
  alphas = [0.0, args.alpha] if args.teacher_cost else [args.alpha]
  runners, configs = {}, {}
  for alpha in alphas:
    fn, state, t_params, batch, lc = build(args, mesh, alpha=alpha, s_cfg=s_cfg, t_cfg=t_cfg)
    runners[alpha] = Runner(fn, state, t_params, batch, mesh, warmup=args.warmup)
    configs[alpha] = lc
    del fn, state, t_params, batch
  for _ in range(args.steps):
    for runner in runners.values():
      runner.step()

  runs = {}
  n_dev = len(jax.devices())
  for alpha, runner in runners.items():
    res = runs[alpha] = runner.result()
    lc = configs[alpha]
    teacher = t_cfg if lc.uses_teacher else None
    res["flops"] = flops_per_token(s_cfg, teacher, args.seq_len, causal=False)
    res["flops_causal"] = flops_per_token(s_cfg, teacher, args.seq_len, causal=True)
    res["tokens_s"] = args.batch * args.seq_len / res["step_s"]
    for key, fl in (("mfu", "flops"), ("mfu_causal", "flops_causal")):
      res[key] = res[fl]["total"] * res["tokens_s"] / (peak * 1e12 * n_dev) if peak else None
    mem = "n/a" if res["mem_gib"] is None else f"{res['mem_gib']:.2f} ({res['mem_source']})"
    mfu = lambda x: "n/a (no peak for this device)" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    print(f"alpha={lc.alpha}: lower {res['lower_s']:.1f} s + compile {res['compile_s']:.1f} s; step "
          f"{res['step_s']:.4f} s (median of {args.steps}, min {res['step_min_s']:.4f}); "
          f"{res['tokens_s']:.0f} tokens/s; {res['flops']['total'] / 1e12:.4g} TFLOP/token "
          f"(student {res['flops']['student'] / 1e9:.3g} GFLOP, teacher {res['flops']['teacher'] / 1e9:.3g}); "
          f"MFU {mfu(res['mfu'])}, causal {mfu(res['mfu_causal'])}; memory {mem} GiB; loss {res['loss']:.4f}",
          flush=True)

  head = [datetime.date.today().isoformat(), commit(), hardware()]
  if args.teacher_cost:  # its own table only: two steps were resident, the memory figures mix them
    t_ce, t_kd = runs[0.0]["step_s"], runs[args.alpha]["step_s"]
    fl = runs[args.alpha]["flops_causal"]
    share, flop_share = (t_kd - t_ce) / t_kd, fl["teacher"] / fl["total"]
    print(f"teacher cost: step {t_ce:.4f} s without the teacher, {t_kd:.4f} s with it: teacher share "
          f"{100 * share:.1f}% of the step (FLOP share {100 * flop_share:.1f}%)", flush=True)
    if not args.no_record:
      append_row(args.benchmarks, "Teacher cost", TEACHER_PREAMBLE, TEACHER_HEADER,
                 head + [config, f"{t_ce:.4f}", f"{t_kd:.4f}", f"{100 * share:.1f}%", f"{100 * flop_share:.1f}%"])
    return runs
  res = runs[args.alpha]
  fmt_mfu = lambda x: "—" if x is None else f"{100 * x:.1f}%"  # noqa: E731
  row = head + [config, f"{res['lower_s'] + res['compile_s']:.1f}", f"{res['step_s']:.4f}",
                f"{res['tokens_s']:.0f}", f"{res['flops']['total'] / 1e12:.3g}", fmt_mfu(res["mfu"]),
                fmt_mfu(res["mfu_causal"]),
                "n/a" if res["mem_gib"] is None else f"{res['mem_gib']:.2f} ({res['mem_source']})"]
  if not args.no_record:
    append_row(args.benchmarks, "Train step", TRAIN_PREAMBLE, TRAIN_HEADER, row)
  return runs


if __name__ == "__main__":
  main()
