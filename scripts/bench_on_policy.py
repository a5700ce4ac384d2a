"""The share of an on-policy step spent generating, on this machine.

  python scripts/bench_on_policy.py [--config configs/tiny_logit.py] [--new 64] [--repeats 5]

Builds the run of `--config` with on-policy steps on (jaxkd.trainer.Run, so the very steps a run compiles), takes
one training batch, and times after a warm-up (compilation excluded; medians of `--repeats`): the ordinary train
step, the on-policy step (sample, then train on the samples), and the sampling alone (`on_policy.sample` of the
student, jitted by itself). Prints each and the sampling's share of the on-policy step.
"""

import argparse
import os
import tempfile
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny_logit.py"))
  p.add_argument("--new", type=int, default=64, help="distill.on_policy.max_new_tokens")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from jaxkd import config_base, on_policy, trainer  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as workdir:
    c = config_base.load(args.config, {"workdir": workdir, "distill.on_policy.fraction": 1.0,
                                       "distill.on_policy.max_new_tokens": args.new, "progress": False})
    run = trainer.Run(c)
    prog = run.program
    with jax.set_mesh(run.mesh):
      state = run._initial_state()  # pylint: disable=protected-access
      batch = run._global_batch(run.loader)  # pylint: disable=protected-access
      teacher = prog.teacher_params
      holder = {"state": state}

      def step(fn):
        def call():
          holder["state"], metrics = fn(holder["state"], teacher, batch)
          return metrics
        return call

      def sample_fn(params, batch, key):
        student = nnx.merge(prog.student_def, params["student"])
        return on_policy.sample(student, batch, key, prog.rollout)

      sample = jax.jit(sample_fn)
      key = jax.random.key(0)
      calls = {"train step (dataset rows)": step(prog.train_step),
               "on-policy step (sample, then train)": step(prog.on_policy_step),
               "sampling alone": lambda: sample(holder["state"].params, batch, key)}
      for call in calls.values():
        jax.block_until_ready(call())  # compile
      got = {name: median_time(call, args.repeats) for name, call in calls.items()}
      metrics = jax.device_get(calls["on-policy step (sample, then train)"]())
    print(f"{os.path.basename(args.config)}: {c.data.batch_size} rows x {c.data.seq_len} tokens, "
          f"{prog.rollout.prompts_per_row} prompt(s) a row, up to {args.new} new tokens at temperature "
          f"{prog.rollout.temperature:g} (mean sampled length {metrics['sampled_len']:.1f}), "
          f"{jax.devices()[0].platform}, median of {args.repeats}:")
    for name, seconds in got.items():
      print(f"  {name:<38} {seconds * 1e3:8.1f} ms")
    share = got["sampling alone"] / got["on-policy step (sample, then train)"]
    print(f"  sampling's share of the on-policy step: {share:.0%}")


if __name__ == "__main__":
  main()
