"""The compiled train step's memory with the teacher as loaded and with `teacher.quantize="int8"`, on this host.

  JAX_PLATFORMS=cpu python scripts/int8_teacher_memory.py [--config configs/qwen2_logit.py] [--batch 1] [--seq_len 2048]

Both steps are `program.abstract_program` of the config (the models' shapes from config.json or jaxkd.models.presets:
nothing is read, allocated or run), lowered and compiled for this host's devices; the figures are XLA's
`memory_analysis()` per device: arguments (student, optimizer state, teacher, batch), temporaries, and the total the
step needs at once (arguments + outputs - donated + temporaries). Beside them, what int8 should save of the
arguments, from the parameter shapes alone: each quantised kernel's bytes less one byte a weight, less its float32
scales. For TPU slices use the ahead-of-time command (`--config.aot.topology=v5e-16 --config.teacher.quantize=int8`).
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GIB = 2**30


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "qwen2_logit.py"))
  parser.add_argument("--batch", type=int, default=1, help="data.batch_size")
  parser.add_argument("--seq_len", type=int, default=2048, help="data.seq_len")
  args = parser.parse_args()

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from jaxkd import config_base, program  # pylint: disable=import-outside-toplevel
  from jaxkd.models import quantize  # pylint: disable=import-outside-toplevel

  jax.config.update("jax_enable_compilation_cache", False)  # compile time means compiling
  rows = []
  for mode in ("", "int8"):
    c = config_base.load(args.config, {"data.batch_size": args.batch, "data.seq_len": args.seq_len,
                                       "teacher.quantize": mode})
    prog = program.abstract_program(c)
    inputs = prog.abstract_inputs()
    start = time.perf_counter()
    with jax.set_mesh(prog.mesh):
      compiled = prog.train_step.lower(*inputs).compile()
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    teacher_bytes = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                        for x in jax.tree.leaves(inputs[1]))
    rows.append((mode or "as loaded", c.teacher.dtype, seconds, m.argument_size_in_bytes, teacher_bytes,
                 m.temp_size_in_bytes, total))
    if mode:
      expected = 0
      for part, names in quantize.TARGETS.items():
        for name in names:
          p = inputs[1]["layers"][part][name]
          k, s = p["kernel"], p["scale"]
          expected += int(np.prod(k.sharding.shard_shape(k.shape))) * (jnp.dtype(c.teacher.dtype).itemsize - 1)
          expected -= int(np.prod(s.sharding.shard_shape(s.shape))) * 4

  print(f"{args.config}: {args.batch} x {args.seq_len} tokens a step; {len(jax.devices())} x {jax.default_backend()}, "
        f"jax {jax.__version__}; teacher {c.teacher.path}, student {c.student.path}")
  print("| teacher | compile s | arguments GiB | of which the teacher | temporaries GiB | total GiB |")
  print("|---|---|---|---|---|---|")
  for mode, dtype, seconds, arguments, teacher, temporaries, total in rows:
    print(f"| {mode} ({dtype}) | {seconds:.1f} | {arguments / GIB:.2f} | {teacher / GIB:.2f} | "
          f"{temporaries / GIB:.2f} | {total / GIB:.2f} |")
  saved = rows[0][3] - rows[1][3]
  print(f"int8 saves {saved / GIB:.3f} GiB of arguments (the parameter shapes say {expected / GIB:.3f}) and "
        f"{(rows[0][5] - rows[1][5]) / GIB:.3f} GiB of temporaries: {(rows[0][6] - rows[1][6]) / GIB:.3f} GiB in all")


if __name__ == "__main__":
  main()
