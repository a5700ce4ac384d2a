"""Measures the data pipeline (chat template + tokenize + pack) in tokens per second on this machine.

    python scripts/bench_data.py                  # bundled chats, and the same chats joined into long ones
    python scripts/bench_data.py --repeat 8 --workers 0 2

For each workload it writes a JSONL file (the bundled ShareGPT chats, repeated), then times, with the cache
off: building the loader (render + tokenize + mask every row) and one epoch of packed batches; and with the
cache on: a second build that reads the tokens back. Tokens are student tokens in the packed rows, padding
excluded. The target is 50,000 tokens/s end to end, enough for one host to keep a fast accelerator fed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time


def machine() -> str:
  cpu = platform.processor() or "cpu"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_workloads(folder: str, repeat: int) -> dict[str, str]:
  from jaxkd.data import CHAT_SHAREGPT

  with open(CHAT_SHAREGPT) as f:
    rows = [json.loads(line) for line in f]
  short = os.path.join(folder, "chats.jsonl")
  with open(short, "w") as f:
    for _ in range(repeat):
      f.writelines(json.dumps(r) + "\n" for r in rows)
  long = os.path.join(folder, "long_chats.jsonl")  # ten chats per conversation: a few hundred tokens each
  with open(long, "w") as f:
    for _ in range(repeat):
      for i in range(0, len(rows) - 9, 10):
        turns = [m for r in rows[i:i + 10] for m in r["conversations"] if m["from"] != "system"]
        f.write(json.dumps({"conversations": turns}) + "\n")
  return {"short chats": short, "long chats": long}


def run(path: str, tok, *, workers: int, seq_len: int, rows: int, cache_dir: str) -> dict:
  from jaxkd.data import default_data_config, make_loader

  cfg = default_data_config()
  cfg.sources = [dict(path=path)]
  cfg.epochs = 1
  cfg.num_workers = workers
  cfg.prefetch = 0  # time the work itself, not its overlap with a consumer
  t0 = time.perf_counter()
  loader = make_loader(cfg, tokenizer=tok, seq_len=seq_len, batch_size=rows, seed=0, cache_dir="")
  t1 = time.perf_counter()
  tokens = 0
  for batch in loader:
    tokens += int((batch["segment_ids"] > 0).sum())
  t2 = time.perf_counter()
  make_loader(cfg, tokenizer=tok, seq_len=seq_len, batch_size=rows, seed=0, cache_dir=cache_dir)  # fills it
  t3 = time.perf_counter()
  make_loader(cfg, tokenizer=tok, seq_len=seq_len, batch_size=rows, seed=0, cache_dir=cache_dir)
  t4 = time.perf_counter()
  return {"examples": loader.stats["examples"], "tokens": tokens, "build_s": t1 - t0, "pack_s": t2 - t1,
          "cached_build_s": t4 - t3, "efficiency": loader.stats["packing_efficiency"]}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeat", type=int, default=8, help="copies of the bundled chats per workload")
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="data.num_workers values to time")
  parser.add_argument("--seq_len", type=int, default=2048)
  parser.add_argument("--rows", type=int, default=8, help="rows per batch")
  args = parser.parse_args(argv)

  import datasets

  from jaxkd.data import TOKENIZER_DIR, load_tokenizer

  datasets.disable_progress_bars()
  tok = load_tokenizer(TOKENIZER_DIR)
  print(f"machine: {machine()}")
  print(f"tokenizer: bundled BPE ({len(tok)} tokens); seq_len {args.seq_len}, {args.rows} rows per batch\n")
  print(f"{'workload':<12} {'workers':>7} {'examples':>9} {'tokens':>9} {'tokenize s':>10} {'pack s':>7} "
        f"{'tokens/s':>9} {'pack eff':>8} {'cached build s':>14}")
  with tempfile.TemporaryDirectory() as folder:
    workloads = write_workloads(folder, args.repeat)
    # Warm-up: the first loader pays one-off imports (datasets, jinja) that a long run does not notice.
    run(workloads["short chats"], tok, workers=0, seq_len=args.seq_len, rows=args.rows,
        cache_dir=os.path.join(folder, "warmup"))
    for name, path in workloads.items():
      for workers in args.workers:
        r = run(path, tok, workers=workers, seq_len=args.seq_len, rows=args.rows,
                cache_dir=os.path.join(folder, f"cache_{name}_{workers}"))
        rate = r["tokens"] / (r["build_s"] + r["pack_s"])
        print(f"{name:<12} {workers:>7} {r['examples']:>9,} {r['tokens']:>9,} {r['build_s']:>10.2f} "
              f"{r['pack_s']:>7.2f} {rate:>9,.0f} {r['efficiency']:>8.1%} {r['cached_build_s']:>14.2f}")
  print("\ntokens/s = packed non-padding tokens / (build: read + template + tokenize + masks, + one epoch of "
        "packing), cache off")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
