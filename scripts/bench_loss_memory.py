"""Compiled temporary memory and FLOPs of the fused KD + CE loss against the naive one.

At Qwen2 shapes (Qwen2-7B teacher width 3584 -> Qwen2-1.5B student width 1536,
both heads 151,936 columns, cut to the tokenizer's 151,646 tokens, bf16 hidden
states and heads), for each token count this lowers and compiles (never runs)

    jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

for the naive loss (materialised logits -> alpha * kd_loss + (1 - alpha) *
cross_entropy_loss, alpha = 0.5) and for ``fused_distill_sums`` divided by the
token count, and reads XLA's ``memory_analysis().temp_size_in_bytes`` and
``cost_analysis()["flops"]``. It runs on a CPU in about a minute: only the
compiler is involved, no array of these sizes is ever allocated.

XLA's cost analysis counts a while-loop body once, not once per trip. The
fused loss is one scan over N / chunk_size chunks, so its FLOPs are corrected
to ``F(N) + (trips - 1) * F(one chunk)``, where F(one chunk) is the same loss
compiled for N = chunk_size tokens (a single trip; it also counts the few
O(N * width) operations outside the loop, so the correction slightly
over-counts). Both are cross-checked against the matmul FLOPs counted by hand,
2 * N * V * (3 * Ds + Dt): student logits, teacher logits, d(hidden), d(head).

    python scripts/bench_loss_memory.py                      # defaults below
    python scripts/bench_loss_memory.py --chunk_size 512,1024,2048,4096 --tokens 8192
    python scripts/bench_loss_memory.py --chunk_size 0,128,256,512,1024,2048 --tokens 2048 \
        --student_width 256 --teacher_width 512 --dtype float32 --time 3   # and runs each: ms a call

Chunk 0 is the default: `fused_loss.chunk_for` the heads' width and the 1 GiB budget (its size is printed).
With --time R the compiled fused loss also runs R times on random inputs after a warm-up (the median is printed).

For each chunk size it also prints the work of one trip, from XLA's cost analysis of the loss compiled for N = chunk
tokens: transcendentals (exp, log) and bytes accessed per (token, column) entry. The bytes are the passes over the
chunk's [C, V] arrays by the loss, its gradient and (with --metrics) its monitoring sums (4 bytes an entry for each
float32 read or write), plus the heads' weights, read again on every trip: with bfloat16 heads about
(6 x student width + 2 x teacher width) / chunk bytes an entry, which is why they fall as the chunk grows.

    python scripts/bench_loss_memory.py --tokens 8192 --chunk_size 0 --temperature 2 --metrics --tpu v5p-8

--metrics makes the fused loss return its monitoring sums as the train step does (without it XLA drops their work).
--tpu SLICE compiles for one chip of that TPU slice on the compile-only devices of libtpu (no TPU needed, e.g.
under JAX_PLATFORMS=cpu), instead of the default backend; it cannot be combined with --time.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import jax
import jax.numpy as jnp

from jaxkd import aot
from jaxkd import sharding as shd
from jaxkd.fused_loss import chunk_for, fused_distill_sums
from jaxkd.losses import cross_entropy_loss, kd_loss

GIB = 2**30


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    parser.add_argument("--tokens", type=ints, default=[8192, 32768],
                        help="comma-separated token counts N (default 8192,32768)")
    parser.add_argument("--chunk_size", type=ints, default=[1024],
                        help="tokens per chunk of the fused loss; a comma-separated list "
                             "compares several (default 1024)")
    parser.add_argument("--student_width", type=int, default=1536)
    parser.add_argument("--teacher_width", type=int, default=3584)
    parser.add_argument("--vocab", type=int, default=151936, help="columns of both heads")
    parser.add_argument("--vocab_size", type=int, default=151646,
                        help="tokenizer vocabulary the logits are cut to (0: no cut)")
    parser.add_argument("--kind", default="forward_kl")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="KD temperature (default 1.0, as the rows in BENCHMARKS.md before 2026-12-06 were "
                             "made; the trainer's default is 2.0)")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--time", type=int, default=0, help="also run the fused loss this many times (0: compile only)")
    parser.add_argument("--metrics", action="store_true",
                        help="the fused loss also returns its monitoring sums (accuracy, agreement, KL at 1, "
                             "teacher CE), as the train step does")
    parser.add_argument("--tpu", default="", help="compile for one chip of this TPU slice (v5p-8, v5e:2x2, ...) on "
                                                  "libtpu's compile-only devices instead of the default backend")
    args = parser.parse_args(argv)
    if args.tpu and args.time:
        parser.error("--tpu only compiles (its devices cannot run anything); drop --time, or --tpu to time on this "
                     "machine's backend")
    return args


def losses(args):
    vocab_size = args.vocab_size or None
    kd_kw = dict(kind=args.kind, vocab_size=vocab_size, temperature=args.temperature)

    def naive(h_s, w_s, h_t, w_t, labels, mask):
        logits_s = h_s @ w_s
        logits_t = jax.lax.stop_gradient(h_t @ w_t)
        kd = kd_loss(logits_s, logits_t, mask, **kd_kw)
        ce = cross_entropy_loss(logits_s, labels, mask, vocab_size=vocab_size)
        return args.alpha * kd + (1 - args.alpha) * ce

    def fused(h_s, w_s, h_t, w_t, labels, mask, *, chunk_size):
        total, aux = fused_distill_sums(h_s, w_s, labels, mask, h_t, w_t, alpha=args.alpha,
                                        chunk_size=chunk_size, **kd_kw)
        loss = total / jnp.maximum(aux["count"], 1.0)
        # With --metrics the monitoring sums are outputs, as in the train step; otherwise XLA drops their work.
        return (loss, aux) if args.metrics else loss

    return naive, fused


def tpu_mesh(name: str):
    """The trainer's mesh on one chip of the compile-only devices of TPU slice `name`."""
    return shd.make_mesh([1, 1, 1], devices=aot.topology_devices(aot.parse_slice(name))[:1])


def compile_stats(loss, n, args, mesh=None, has_aux=False):
    """(temp bytes, XLA's cost analysis, compile seconds, median run seconds or None) of value_and_grad(loss), on
    `mesh`'s one device if given."""
    dtype = jnp.dtype(args.dtype)
    sharding = {} if mesh is None else {"sharding": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())}
    S = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, **sharding)  # noqa: E731
    shapes = (S((n, args.student_width), dtype), S((args.student_width, args.vocab), dtype),
              S((n, args.teacher_width), dtype), S((args.teacher_width, args.vocab), dtype),
              S((n,), jnp.int32), S((n,), jnp.bool_))
    start = time.perf_counter()
    jitted = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=has_aux))
    if mesh is None:
        compiled = jitted.lower(*shapes).compile()
    else:
        with jax.set_mesh(mesh):
            compiled = jitted.lower(*shapes).compile()
    seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one per program
    run_s = None
    if args.time:
        keys = jax.random.split(jax.random.key(0), 4)
        args_in = [jax.random.normal(k, s.shape, s.dtype) * (0.05 if i % 2 else 1.0)
                   for i, (k, s) in enumerate(zip(keys, shapes[:4]))]
        args_in += [jax.random.randint(keys[0], (n,), 0, args.vocab_size or args.vocab), jnp.ones((n,), bool)]
        jax.block_until_ready(compiled(*args_in))
        times = []
        for _ in range(args.time):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args_in))
            times.append(time.perf_counter() - start)
        run_s = sorted(times)[len(times) // 2]
    return compiled.memory_analysis().temp_size_in_bytes, cost, seconds, run_s


def matmul_flops(n, args):
    return 2 * n * args.vocab * (3 * args.student_width + args.teacher_width)


def main(argv=None):
    args = parse_args(argv)
    naive, fused = losses(args)
    print(f"command: python scripts/bench_loss_memory.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    mesh = tpu_mesh(args.tpu) if args.tpu else None
    target = f"one chip of TPU {args.tpu} (compile-only devices)" if args.tpu else jax.default_backend()
    print(f"backend: {target}, jax {jax.__version__}; heads {args.vocab} columns, "
          f"vocab_size {args.vocab_size or 'none (no cut)'}, {args.dtype}, kind {args.kind}, "
          f"temperature {args.temperature:g}, alpha {args.alpha}; student width {args.student_width}, "
          f"teacher width {args.teacher_width}")
    print("compiling, then running the fused loss ..." if args.time else "compiling only (nothing is run) ...",
          flush=True)

    rows, naive_stats, fused_temp = [], {}, {}
    one_chunk = {}  # chunk -> XLA's cost analysis of one trip (the loss compiled for N = chunk)
    for n in args.tokens:
        if not args.time:
            temp, cost, seconds, _ = compile_stats(naive, n, args, mesh)
            naive_stats[n] = (temp, float(cost["flops"]), seconds, None)
        for asked in args.chunk_size:
            chunk = asked or chunk_for(args.vocab)  # 0: the default, from the budget
            loss = lambda *a, chunk=chunk: fused(*a, chunk_size=chunk)  # noqa: E731
            if chunk not in one_chunk:
                one_chunk[chunk] = compile_stats(loss, chunk, args, mesh, args.metrics)[1]
            temp, cost, seconds, run_s = compile_stats(loss, n, args, mesh, args.metrics)
            trips = -(-n // chunk)
            flops_raw = float(cost["flops"])
            flops = flops_raw + (trips - 1) * float(one_chunk[chunk]["flops"])
            fused_temp[n, asked] = temp
            rows.append((n, asked, f"{min(chunk, n)} (default)" if not asked else str(chunk), trips, temp, flops_raw, flops,
                         seconds, run_s))

    print()
    for chunk, cost in one_chunk.items():
        entries = chunk * args.vocab
        print(f"one trip of chunk {chunk} (value and gradient{', metrics' if args.metrics else ''}): "
              f"{float(cost.get('transcendentals', 0.0)) / entries:.2f} transcendentals and "
              f"{float(cost.get('bytes accessed', 0.0)) / entries:.1f} bytes accessed per (token, column)")
    print()
    if args.time:  # runs the fused loss only: the naive one's [N, V] logits are what it avoids
        print("| tokens | chunk | trips | fused temp GiB | fused ms a call (fwd + bwd, median) | compile s |")
        print("|---:|---:|---:|---:|---:|---:|")
        for n, _, chunk, trips, temp, _, _, seconds, run_s in rows:
            print(f"| {n:,} | {chunk} | {trips} | {temp / GIB:.2f} | {run_s * 1e3:.0f} | {seconds:.1f} |")
        return
    print("| tokens | chunk | trips | naive temp GiB | fused temp GiB | fused / naive | naive TFLOP "
          "| fused TFLOP (XLA raw) | fused TFLOP (x trips) | matmul TFLOP (by hand) | extra FLOPs "
          "| compile s naive / fused |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, _, chunk, trips, temp, flops_raw, flops, seconds, _ in rows:
        naive_temp, naive_flops, naive_s, _ = naive_stats[n]
        print(f"| {n:,} | {chunk} | {trips} | {naive_temp / GIB:.2f} | {temp / GIB:.2f} "
              f"| {temp / naive_temp:.3f} | {naive_flops / 1e12:.2f} | {flops_raw / 1e12:.2f} "
              f"| {flops / 1e12:.2f} | {matmul_flops(n, args) / 1e12:.2f} "
              f"| {100 * (flops / naive_flops - 1):+.2f}% | {naive_s:.1f} / {seconds:.1f} |")

    print()
    lo, hi = min(args.tokens), max(args.tokens)
    for chunk in args.chunk_size:
        n0 = lo
        ratio = fused_temp[n0, chunk] / naive_stats[n0][0]
        line = f"chunk {chunk or 'default'}: fused/naive temp at {n0:,} tokens = {ratio:.3f} (target <= 0.25)"
        if hi != lo:
            growth = fused_temp[hi, chunk] / fused_temp[lo, chunk]
            line += f"; fused temp growth {lo:,} -> {hi:,} = {growth:.3f}x (target <= 1.25)"
        extra = max(f / naive_stats[n][1] - 1 for n, asked, _, _, _, _, f, _, _ in rows if asked == chunk)
        line += f"; extra FLOPs at most {100 * extra:+.2f}% (target <= 5%)"
        print(line)


if __name__ == "__main__":
    main()
