"""Generation speed of `generate.sample_on_device` (the decode loop in one compiled call) on this machine.

  python scripts/bench_generate.py [--model tiny:teacher-trained] [--batch 8] [--new 64] [--temperature 0.9]

Times the compiled call after one warm-up call (compilation excluded) and prints new tokens a second; rows run
to the length limit (no end id), so every row makes `--new` tokens.
"""

import argparse
import time

import jax
import jax.numpy as jnp


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="tiny:teacher-trained")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--new", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.9)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from jaxkd import data, generate, models, tiny  # pylint: disable=import-outside-toplevel
  folder = tiny.resolve(args.model)
  model = models.from_pretrained(folder, dtype="float32")
  prompt = generate.encode_prompt(data.load_tokenizer(folder), "Name three fruits.")
  ids = jnp.asarray([prompt] * args.batch, jnp.int32)
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda state, ids, key: generate.sample_on_device(
      nnx.merge(graphdef, state), ids, jnp.ones_like(ids), key, max_new_tokens=args.new,
      temperature=args.temperature, top_p=0.95))
  jax.block_until_ready(run(state, ids, jax.random.key(0)))
  times = []
  for i in range(args.repeats):
    start = time.perf_counter()
    tokens, lengths = jax.block_until_ready(run(state, ids, jax.random.key(i + 1)))
    times.append(time.perf_counter() - start)
  best = sorted(times)[len(times) // 2]
  made = int(lengths.sum())
  print(f"{args.model}: {args.batch} rows x {args.new} new tokens after a {len(prompt)}-token prompt: "
        f"{best * 1e3:.1f} ms a call (median of {args.repeats}), {made / best:,.0f} new tokens/s "
        f"({jax.devices()[0].platform})")


if __name__ == "__main__":
  main()
