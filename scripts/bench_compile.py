"""Compile time of the KD train step against depth: the layers run under `jax.lax.scan`, so it stays flat.

For each depth L, a small-width student and teacher, both L layers deep, build the same jitted train step
as `scripts/bench.py` (fused KD + CE loss, AdamW, 8 packed rows of 128 tokens) and this times
`train_step.lower(...)` and `.compile()` with the persistent compilation cache off, and counts the lines of
the lowered StableHLO and of the optimised HLO (a scanned block appears once, whatever L is). Nothing runs.

    python scripts/bench_compile.py                       # L = 4, 16, 32; appends to BENCHMARKS.md
    python scripts/bench_compile.py --layers 2,8 --remat full --no_record
    python scripts/bench_compile.py --layers 4,16 --unroll    # contrast: the same scan fully unrolled
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
import time
import types

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the sibling script: model, state and batch building)

from jaxkd import sharding as shd  # noqa: E402
from jaxkd.models import ModelConfig, transformer  # noqa: E402

PREAMBLE = """
`python scripts/bench_compile.py`: `jit(train_step).lower(...)` and `.compile()` wall time for a
small-width student (width 128, 4 heads, 2 KV heads) and teacher (width 192, 6 heads, 2 KV heads),
**both** L layers deep, vocab 1024, 8 packed rows x 128 tokens, float32, persistent cache off; line
counts of the lowered StableHLO and of the compiled (optimised) HLO. The layers are one `lax.scan`, so
the program, and the time to compile it, does not grow with L.
"""

HEADER = ["date", "commit", "hardware", "layers", "remat / variant", "lower s", "compile s", "StableHLO lines",
          "compiled HLO lines"]


def configs(layers: int):
  common = dict(model_type="qwen2", vocab_size=1024, num_layers=layers, head_dim=32, max_position_embeddings=512,
                qkv_bias=True)
  student = ModelConfig(hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2, tie_embeddings=True,
                        **common)
  teacher = ModelConfig(hidden_size=192, intermediate_size=384, num_heads=6, num_kv_heads=2, **common)
  return student, teacher


def unroll_decoder_scan() -> None:
  """Makes the decoder's `jax.lax.scan` fully unrolled (this process only): the depth-proportional program
  a Python loop over layers would give, for contrast."""
  lax = types.SimpleNamespace(**{k: getattr(jax.lax, k) for k in dir(jax.lax) if not k.startswith("__")})
  lax.scan = functools.partial(jax.lax.scan, unroll=True)
  patched = types.ModuleType("jax_with_unrolled_scan")
  patched.__dict__.update(jax.__dict__)
  patched.lax = lax
  transformer.jax = patched


def compile_once(layers: int, remat: str, student_only: bool) -> dict:
  args = bench.parse_args(["--seq_len", "128", "--batch", "8", "--remat", remat, "--compute_dtype", "float32",
                           "--teacher_dtype", "float32", "--mesh", "1,-1,1"])
  s_cfg, t_cfg = configs(layers)
  mesh = shd.make_mesh([1, -1, 1])
  fn, state, t_params, batch, _ = bench.build(args, mesh, alpha=0.5, s_cfg=s_cfg,
                                              t_cfg=None if student_only else t_cfg)
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    lowered = fn.lower(state, t_params, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
  return {"lower_s": t1 - t0, "compile_s": t2 - t1, "stablehlo_lines": len(lowered.as_text().splitlines()),
          "hlo_lines": len(compiled.as_text().splitlines())}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--layers", default="4,16,32", help="comma-separated depths")
  p.add_argument("--remat", default="none")
  p.add_argument("--student_only", action="store_true", help="no teacher (alpha = 0)")
  p.add_argument("--unroll", action="store_true", help="unroll the layer scan (contrast)")
  p.add_argument("--no_record", action="store_true")
  p.add_argument("--benchmarks", default=os.path.join(bench.ROOT, "BENCHMARKS.md"))
  args = p.parse_args(argv)
  jax.config.update("jax_enable_compilation_cache", False)
  if args.unroll:
    unroll_decoder_scan()
  print(f"# {bench.hardware()}; student{'' if args.student_only else ' and teacher'} of each depth, "
        f"remat {args.remat}"
        f"{', scan UNROLLED' if args.unroll else ''}", flush=True)
  rows = []
  for layers in [int(x) for x in args.layers.split(",")]:
    r = compile_once(layers, args.remat, args.student_only)
    print(f"L={layers:3d}: lower {r['lower_s']:.2f} s, compile {r['compile_s']:.2f} s, StableHLO "
          f"{r['stablehlo_lines']} lines, compiled HLO {r['hlo_lines']} lines", flush=True)
    variant = args.remat + (" (student only)" if args.student_only else "")
    variant += ", **unrolled**" if args.unroll else ""
    rows.append([str(layers), variant, f"{r['lower_s']:.2f}",
                 f"{r['compile_s']:.2f}", str(r["stablehlo_lines"]), str(r["hlo_lines"])])
  if not args.no_record:
    head = [datetime.date.today().isoformat(), bench.commit(), bench.hardware()]
    for row in rows:
      bench.append_row(args.benchmarks, "Compile time against depth (scanned layers)", PREAMBLE, HEADER, head + row)


if __name__ == "__main__":
  main()
