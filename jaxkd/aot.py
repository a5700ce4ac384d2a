"""Ahead of time: compile a run's exact train step for a TPU slice from any host, and say whether it fits.

  JAX_PLATFORMS=cpu python -m jaxkd.train --config configs/qwen2_logit.py --config.aot.topology=v5e-16

The step is the one the run would execute (`program.abstract_program`: the config's models from config.json,
shardings, remat, attention, fused loss, micro-batches, teacher), compiled by the TPU compiler (libtpu, the
`tpu` extra) for the slice's compile-only devices; no weight or data is read and nothing trains. It prints
the per-chip memory XLA reports against the chip's HBM; the exit status is 0 when it fits, 1 when not.
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax

from jaxkd import config_base, program
from jaxkd.models import attention as attention_lib
from jaxkd.models import hf_io

GIB = 2**30
# Per chip: HBM in GiB; the torus's dimensions; whether the slice name counts TensorCores (two a chip). Not v4:
# its compile-only topology has a device per TensorCore, not per chip, so its per-device figures are not a chip's
# (unchecked on a real v4).
GENERATIONS = {"v5p": (95, 3, True), "v5e": (16, 2, False), "v6e": (32, 2, False)}
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
  m = re.fullmatch(r"(v5p|v5e|v6e):(\d+(?:x\d+)+)", name) or re.fullmatch(r"(v5p|v5e|v6e)-(\d+)", name)
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


def report(c) -> int:
  """Compiles config `c`'s step for `c.aot.topology` and prints what it needs per chip; 0 if it fits, else 1."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  tpu = parse_slice(c.aot.topology)
  try:
    devices = topologies.get_topology_desc(topology_name=tpu.topology, platform="tpu").devices
  except Exception as e:  # noqa: BLE001  (no libtpu, or a topology it does not know)
    raise config_base.ConfigError(
        f"config.aot.topology={c.aot.topology!r}: the TPU compiler could not describe {tpu.topology} ({e}); it "
        "needs libtpu: pip install -e \".[tpu]\"") from None
  hosts = len({d.process_index for d in devices})
  start = time.time()
  prog = program.abstract_program(c, devices)
  mesh = ", ".join(f"{a} {n}" for a, n in prog.mesh.shape.items())
  print(f"aot: {tpu.name} ({tpu.topology}: {len(devices)} chips on {hosts} host(s), {tpu.hbm_gib:g} GiB HBM each); "
        f"mesh {mesh}; {c.data.batch_size} x {c.data.seq_len} tokens a step")
  kernels = _kernels(c, prog)
  print("  attention: " + "; ".join(f"{k} {v}" for k, v in kernels.items()))
  try:
    with jax.set_mesh(prog.mesh):
      compiled = prog.train_step.lower(*prog.abstract_inputs()).compile()
  except Exception as e:  # noqa: BLE001
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
      raise
    print(f"  compiled in {time.time() - start:.1f} s: out of HBM, it does not fit ({tpu.hbm_gib:g} GiB a chip). "
          "The compiler said:\n    " + "\n    ".join(text.strip().splitlines()[:6]))
    print(_advice())
    return 1
  m = compiled.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  fits = total <= tpu.hbm_gib * GIB
  print(f"  compiled in {time.time() - start:.1f} s")
  print(f"  per chip: arguments {m.argument_size_in_bytes / GIB:.2f} GiB, temporaries "
        f"{m.temp_size_in_bytes / GIB:.2f}, outputs {m.output_size_in_bytes / GIB:.2f} (donated "
        f"{m.alias_size_in_bytes / GIB:.2f}); total "
        f"{total / GIB:.2f} GiB of {tpu.hbm_gib:g} GiB HBM: {'fits' if fits else 'does NOT fit'}")
  if not fits:
    print(_advice())
  return 0 if fits else 1


def _advice() -> str:
  return ("  to fit: lower data.batch_size (or raise optimizer.micro_batches: the same batch in smaller pieces), "
          "set student.remat to dots_no_batch_attention or full, lower distill.chunk_size, or take a larger "
          "slice")
