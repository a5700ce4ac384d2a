"""Ahead of time: compile a run's exact train step for a TPU slice from any host, and say whether it fits.

  JAX_PLATFORMS=cpu python -m jaxkd.train --config configs/qwen2_logit.py --config.aot.topology=v5e-16

The step is the one the run would execute (`program.abstract_program`: the config's models from config.json,
shardings, remat, attention, fused loss, micro-batches, teacher), compiled by the TPU compiler (libtpu, the
`tpu` extra) for the slice's compile-only devices; no weight or data is read and nothing trains. It prints
the per-chip memory XLA reports against the chip's HBM; the exit status is 0 when it fits, 1 when not.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd import config_base, program
from jaxkd import sharding as shd
from jaxkd.models import attention as attention_lib
from jaxkd.models import hf_io
from jaxkd.models import transformer as transformer_lib

GIB = 2**30
# Per chip: HBM in GiB; the torus's dimensions; whether the slice name counts TensorCores (two a chip).
GENERATIONS = {"v4": (32, 3, True), "v5p": (95, 3, True), "v5e": (16, 2, False), "v6e": (32, 2, False)}
# v4's compile-only topology has a device per TensorCore unless asked for megacore chips, as JAX runs a v4 (one
# device a chip); the host bounds are v4's 2 x 2 x 1 chips a host (MaxText's accelerator_to_spec_map says the same).
TOPOLOGY_OPTIONS = {"v4": dict(chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1), num_slices=1,
                               wrap=(False, False, False))}
GRIDS = {2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
         3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # as asked: "v5e-16" or "v5p:2x2x1"
  topology: str  # the compiler's name: "v5e:4x4"
  generation: str
  hbm_gib: float  # per chip


def parse_slice(name: str) -> Slice:
  """A slice as Cloud TPU sells it (v5e-16, v5p-8, v6e-8: TensorCores for v5p, chips for v5e and v6e) or a raw
  topology ("v5p:2x2x1"); ValueError naming the known forms otherwise."""
  known = ", ".join(f"{g}-N" for g in GENERATIONS)
  gens = "|".join(GENERATIONS)
  m = re.fullmatch(rf"({gens}):(\d+(?:x\d+)+)", name) or re.fullmatch(rf"({gens})-(\d+)", name)
  if m is None:
    raise ValueError(f"aot.topology={name!r}: use a TPU slice ({known}, e.g. v5e-16, v5p-8) or a topology such as "
                     "v5p:2x2x1")
  gen, rest = m.groups()
  hbm, dims, counts_cores = GENERATIONS[gen]
  if ":" in name:
    if len(rest.split("x")) != dims:
      raise ValueError(f"aot.topology={name!r}: a {gen} topology has {dims} dimensions, e.g. {gen}:{GRIDS[dims][4]}")
    return Slice(name, name, gen, hbm)
  chips = int(rest) // 2 if counts_cores else int(rest)
  if chips not in GRIDS[dims]:
    raise ValueError(f"aot.topology={name!r}: no {gen} slice of {chips} chips is known; known: "
                     f"{', '.join(f'{gen}-{c * 2 if counts_cores else c}' for c in GRIDS[dims])}")
  return Slice(name, f"{gen}:{GRIDS[dims][chips]}", gen, hbm)


def _kernels(c, prog: program.Program) -> dict[str, str]:
  """The attention kernel each model gets on a TPU, with the fallback's reason where there is one."""
  out = {}
  sides = [("student", c.student.attention, prog.student_cfg, c.student.compute_dtype, c.data.seq_len)]
  if prog.teacher_cfg is not None:
    t_len = (c.data.teacher_seq_len or c.data.seq_len) if prog.lc.cross_tokenizer else c.data.seq_len
    sides.append(("teacher", c.teacher.attention, prog.teacher_cfg, c.teacher.dtype, t_len))
  for name, requested, cfg, dtype, length in sides:
    choice = attention_lib.choose_implementation(requested, backend="tpu", dtype=hf_io.resolve_dtype(dtype),
                                                 head_dim=cfg.head_dim, q_len=length, kv_len=length)
    out[name] = choice.implementation + (f" ({choice.reason})" if choice.reason else "")
  return out


@dataclasses.dataclass(frozen=True)
class Probe:
  """One compile of the step for a chip: its per-chip bytes where it compiled, the compiler's message where not."""
  batch: int
  remat: str
  seconds: float
  memory: Any = None  # compiled.memory_analysis()
  error: str = ""  # the compiler's out-of-HBM message
  temporaries_needed: float = 0.0  # bytes, read from that message

  @property
  def total(self) -> float:
    """Bytes a chip holds: arguments, temporaries and the outputs not written over donated arguments."""
    m = self.memory
    if m is None:
      return self.temporaries_needed
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def topology_devices(tpu: Slice) -> list:
  """The compile-only devices of a slice, one a chip."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  # Compiling holds no TPU: let two compiles (two commands, or one beside the test suite) load libtpu at once,
  # which its lock file otherwise refuses.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  return topologies.get_topology_desc(topology_name=tpu.topology, platform="tpu",
                                      **TOPOLOGY_OPTIONS.get(tpu.generation, {})).devices


def _devices(c):
  tpu = parse_slice(c.aot.topology)
  try:
    return tpu, topology_devices(tpu)
  except Exception as e:  # noqa: BLE001  (no libtpu, or a topology it does not know)
    raise config_base.ConfigError(
        f"config.aot.topology={c.aot.topology!r}: the TPU compiler could not describe {tpu.topology} ({e}); it "
        "needs libtpu: pip install -e \".[tpu]\"") from None


def _compile(c, devices, prog: program.Program | None = None) -> Probe:
  start = time.time()
  prog = prog or program.abstract_program(c, devices)
  return _compile_jitted(prog.train_step, prog.abstract_inputs(), prog.mesh, c, start)


def _compile_jitted(jitted, abstract_args, mesh, c, start: float) -> Probe:
  """Compiles `jitted` on `abstract_args` under `mesh`; an out-of-HBM compile becomes a Probe with the message."""
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)  # a compile-only TPU client cannot read or write it
  try:
    with jax.set_mesh(mesh):
      compiled = jitted.lower(*abstract_args).compile()
  except Exception as e:  # noqa: BLE001
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
      raise
    needed = re.search(r"temporaries \(([0-9.]+)([KMGT])\)", text)
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    return Probe(c.data.batch_size, c.student.remat, time.time() - start, error=text.strip(),
                 temporaries_needed=float(needed.group(1)) * scale[needed.group(2)] if needed else 0.0)
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
  return Probe(c.data.batch_size, c.student.remat, time.time() - start, memory=compiled.memory_analysis())


def report(c) -> int:
  """Compiles config `c`'s step for `c.aot.topology` and prints what it needs per chip; 0 if it fits, else 1.
  With `c.aot.search`, searches the largest batch instead (`search`)."""
  tpu, devices = _devices(c)
  hosts = len({d.process_index for d in devices})
  start = time.time()
  prog = program.abstract_program(c, devices)
  mesh = ", ".join(f"{a} {n}" for a, n in prog.mesh.shape.items())
  print(f"aot: {tpu.name} ({tpu.topology}: {len(devices)} chips on {hosts} host(s), {tpu.hbm_gib:g} GiB HBM each); "
        f"mesh {mesh}; {c.data.batch_size} x {c.data.seq_len} tokens a step")
  kernels = _kernels(c, prog)
  print("  attention: " + "; ".join(f"{k} {v}" for k, v in kernels.items()))
  if prog.student_base is not None:
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    lo = c.student.lora
    print(f"  student: LoRA rank {lo.rank} on {lo.targets}: {count(prog.params['student']):,} trained parameters "
          f"(with their optimizer moments), {count(prog.student_base):,} frozen")
  if c.aot.search:
    return search(c, tpu, devices, hosts)
  status = _print(_compile(c, devices, prog), tpu, time.time() - start, _advice(c))
  if prog.on_policy_step is None:
    return status
  r = prog.rollout
  print(f"  on-policy step ({c.distill.on_policy.fraction:g} of the steps): {'the teacher' if r.seq_kd else 'the student'} "
        f"completes {c.data.batch_size * r.prompts_per_row} prompts of up to {r.prompt_len} tokens with up to "
        f"{r.max_new_tokens} new ones, then trains on them")
  start = time.time()
  on_policy_probe = _compile_jitted(prog.on_policy_step, prog.abstract_inputs(), prog.mesh, c, start)
  return max(status, _print(on_policy_probe, tpu, time.time() - start, _advice(c)))


def _print(probe: Probe, tpu: Slice, seconds: float, advice: str) -> int:
  """Prints a compile's per-chip memory against the chip's HBM; 0 if it fits, else 1."""
  if probe.error:
    print(f"  compiled in {seconds:.1f} s: out of HBM, it does not fit ({tpu.hbm_gib:g} GiB a chip). "
          "The compiler said:\n    " + "\n    ".join(probe.error.splitlines()[:6]))
    print(advice)
    return 1
  m = probe.memory
  fits = _fits(probe, tpu)
  print(f"  compiled in {seconds:.1f} s")
  print(f"  per chip: arguments {m.argument_size_in_bytes / GIB:.2f} GiB, temporaries "
        f"{m.temp_size_in_bytes / GIB:.2f}, outputs {m.output_size_in_bytes / GIB:.2f} (donated "
        f"{m.alias_size_in_bytes / GIB:.2f}); total "
        f"{probe.total / GIB:.2f} GiB of {tpu.hbm_gib:g} GiB HBM: {'fits' if fits else 'does NOT fit'}")
  if not fits:
    print(advice)
  return 0 if fits else 1


def report_capture(c) -> int:
  """Compiles config `c`'s capture (the teacher's forward and top-k, `jaxkd.capture`) for `c.aot.topology` and
  prints what it needs per chip; 0 if it fits, else 1."""
  from jaxkd import signals  # pylint: disable=import-outside-toplevel
  from jaxkd import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from jaxkd import step as step_lib  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  tpu, devices = _devices(c)
  start = time.time()
  mesh = program.make_mesh(c, devices)
  lc = step_lib.loss_config(c)
  toks = program.load_tokenizers(c, dataclasses.replace(lc, cached=False), presets_ok=True)
  teacher = program.load_teacher(c, mesh, abstract=True)
  t_def, t_state = nnx.split(teacher)
  t_sh = shd.module_shardings(mesh, teacher)
  keys = ("input_ids", "segment_ids", "positions")
  b_sh = shd.batch_shardings(mesh, keys)
  vocab = int(c.distill.vocab_size or len(toks.student))
  fn = jax.jit(signals.top_k_fn(t_def, c.capture.top_k, vocab, lc.chunk_size, lc.chunk_budget),
               in_shardings=(t_sh, b_sh))
  batch = {k: jax.ShapeDtypeStruct((c.data.batch_size, c.data.seq_len), jnp.int32, sharding=b_sh[k]) for k in keys}
  args = (ckpt_lib.abstract_like(nnx.to_pure_dict(t_state), t_sh), batch)
  hosts = len({d.process_index for d in devices})
  print(f"aot capture: {tpu.name} ({tpu.topology}: {len(devices)} chips on {hosts} host(s), {tpu.hbm_gib:g} GiB HBM "
        f"each); the teacher's top {c.capture.top_k} over {c.data.batch_size} x {c.data.seq_len} tokens a batch")
  return _print(_compile_jitted(fn, args, mesh, c, start), tpu, time.time() - start, _advice(c, training=False))


def _fits(probe: Probe, tpu: Slice) -> bool:
  return not probe.error and probe.total <= tpu.hbm_gib * GIB


def search(c, tpu: Slice, devices, hosts: int) -> int:
  """The largest global batch whose step fits a chip, for each of `aot.remat_choices` (least recomputation
  first), and the cheapest of them that fits `data.batch_size`. Prints each compile as it comes and the answer;
  0 when `data.batch_size` fits with one of the choices, 1 when not."""
  mesh = shd.make_mesh(c.mesh.to_dict(), devices)
  unit = math.lcm(shd.batch_shards(mesh), c.optimizer.micro_batches, hosts)
  cap = max(c.aot.max_batch // unit, 1)
  print(f"  search: batches in steps of {unit} rows (the mesh's data x fsdp, micro-batches and hosts), up to "
        f"{cap * unit}; remat {', '.join(config_base.aot_remat_choices(c))}")
  print(f"  {'remat':<24} {'rows':>6} {'tokens':>9} {'GiB/chip':>9}  {'':<12} compile s")
  largest: dict[str, int] = {}
  start = max(c.data.batch_size // unit, 1)
  for remat in config_base.aot_remat_choices(c):
    def probe(rows, remat=remat):
      trial = copy.deepcopy(c)
      trial.data.batch_size, trial.student.remat = rows, remat
      p = _compile(trial, devices)
      gib = f"{p.total / GIB:9.2f}" if p.total else f"{'?':>9}"
      what = "fits" if _fits(p, tpu) else ("out of HBM" if p.error else "too big")
      print(f"  {remat:<24} {rows:>6} {rows * c.data.seq_len:>9} {gib}{'+' if p.error else ' '} {what:<12} "
            f"{p.seconds:.0f}", flush=True)
      return _fits(p, tpu), 0.0 if p.error else p.total  # an out-of-HBM figure is temporaries alone
    k = largest_fitting(lambda k, probe=probe: probe(k * unit), tpu.hbm_gib * GIB, start=start, cap=cap)
    largest[remat], start = k * unit, max(k, start)  # more recomputation holds at least as large a batch
  print("  (+: the compiler's figure for temporaries alone, from its out-of-HBM message)")
  for remat, rows in largest.items():
    bound = " (aot.max_batch, the search's bound)" if rows == cap * unit else ""
    what = f"{rows} rows ({rows * c.data.seq_len} tokens) a step{bound}" if rows else "none fits"
    print(f"  largest batch with remat {remat}: {what}")
  cheapest = next((r for r, rows in largest.items() if rows >= c.data.batch_size), None)
  if cheapest is None:
    print(f"  data.batch_size={c.data.batch_size} fits with none of them")
    print(_advice(c))
    return 1
  print(f"  data.batch_size={c.data.batch_size} fits; the cheapest remat that fits it: {cheapest}")
  return 0


def largest_fitting(fits_at, limit: float, *, start: int, cap: int) -> int:
  """The largest k in [1, cap] with fits_at(k)[0] (0 if none), for a fit that holds up to some k and fails past it.

  fits_at(k) -> (fits, bytes) compiles. Memory grows close to linearly in the batch, so the line through the two
  compiles nearest the boundary predicts it; the prediction is checked with its neighbour and, where it missed,
  the bracket is halved, so the compiles stay few (about 4 at a typical size) and at worst logarithmic."""
  seen: dict[int, tuple[bool, float]] = {}

  def probe(k):
    if k not in seen:
      seen[k] = fits_at(k)
    return seen[k][0]

  k = min(max(start, 1), cap)
  probe(k)
  if seen[k][0] and k < cap:
    probe(min(2 * k, cap))
  elif not seen[k][0] and k > 1:
    probe(max(k // 2, 1))
  sides: list[bool] = []  # whether each line prediction fitted
  while True:
    lo = max((k for k, (ok, _) in seen.items() if ok), default=0)
    hi = min((k for k, (ok, _) in seen.items() if not ok), default=cap + 1)
    if hi <= lo + 1:
      return lo
    # Two predictions in a row on the same side mean the line is bent there: double or halve once. A prediction
    # of one row-step past the largest fit is the line's own check and does not count.
    stuck = len(sides) >= 2 and sides[-1] == sides[-2]
    nxt = None if stuck else _on_the_line(seen, limit, lo, hi)
    if nxt is None:  # double while nothing has failed, else halve the bracket
      sides.clear()
      probe(max(min(2 * lo, hi - 1) if hi > cap else (lo + hi) // 2, lo + 1))
    elif nxt == lo + 1:
      probe(nxt)
    else:
      sides.append(probe(nxt))


def _on_the_line(seen: dict[int, tuple[bool, float]], limit: float, lo: int, hi: int) -> int | None:
  """The largest k in (lo, hi) under `limit` on the line through the bracket's ends, or through the largest fit
  and the smallest one where no failure has a figure."""
  ends = [k for k in (lo, hi) if k in seen and seen[k][1]]
  if len(ends) < 2:
    fit = sorted(k for k, (ok, m) in seen.items() if ok and m)
    ends = [fit[0], fit[-1]] if len(fit) >= 2 else []
  if len(ends) < 2:
    return None
  (k1, m1), (k2, m2) = ((k, seen[k][1]) for k in ends)
  slope = (m2 - m1) / (k2 - k1)
  k = int(k1 + (limit - m1) // slope) if slope > 0 else hi
  # Past a known failure the line is wrong there (bisect); at or below the largest fit, ask for one step more.
  return None if k >= hi else max(k, lo + 1)


def _advice(c, *, training: bool = True) -> str:
  """What to change, from what the config already has (a remat it uses is not suggested again)."""
  from jaxkd import step as step_lib  # pylint: disable=import-outside-toplevel

  lc = step_lib.loss_config(c)
  int8 = (", hold the teacher in int8 (teacher.quantize=\"int8\")"
          if lc.uses_teacher and not lc.cached and not c.teacher.quantize else "")
  if not training:  # the capture: a forward pass and one chunk of logits
    return (f"  to fit: lower data.batch_size or distill.chunk_size, keep the teacher in bfloat16 (teacher.dtype){int8}, "
            "or take a larger slice")
  order = transformer_lib.REMAT_BY_COST
  more = [p for p in order[order.index(c.student.remat) + 1:]] if c.student.remat in order else []
  remat = f", set student.remat to {' or '.join(dict.fromkeys([more[0], more[-1]]))} (now {c.student.remat})" \
      if more else ""
  return (f"  to fit: lower data.batch_size (or raise optimizer.micro_batches, now {c.optimizer.micro_batches}: the "
          f"same batch in smaller pieces){remat}, lower distill.chunk_size (now {c.distill.chunk_size}){int8}, or "
          "take a larger slice")
