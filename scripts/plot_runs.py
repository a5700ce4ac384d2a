"""Plots the curves of one or several runs from their metrics.jsonl.

  python scripts/plot_runs.py workdir/run_a workdir/run_b --out curves.png [--keys loss,ce,kd]

One panel per metric: training curves as lines, held-out values (eval_*) as dots on the same panel.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxkd.reporting import read_metrics  # noqa: E402


def plot(workdirs, out, keys):
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    sys.exit("plot_runs.py draws with matplotlib, which is not installed: pip install -e \".[scripts]\"")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  runs = {os.path.basename(os.path.normpath(w)) or w: read_metrics(w) for w in workdirs}
  keys = [k for k in keys if any(k in m for train, _ in runs.values() for m in train)
          or any(f"eval_{k}" in m for _, evals in runs.values() for m in evals)]
  if not keys:
    raise SystemExit(f"none of the requested metrics are in {workdirs}")
  fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for i, (name, (train, evals)) in enumerate(runs.items()):
      color = f"C{i}"
      pts = [(m["step"], m[key]) for m in train if key in m]
      if pts:
        ax.plot(*zip(*pts), color=color, lw=1, label=f"{name}")
      pts = [(m["step"], m[f"eval_{key}"]) for m in evals if f"eval_{key}" in m]
      if pts:
        ax.plot(*zip(*pts), "o--", color=color, ms=4, lw=0.8, label=f"{name} (held-out)")
    ax.set(title=key, xlabel="step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("workdirs", nargs="+")
  p.add_argument("--out", default="curves.png")
  p.add_argument("--keys", default="loss,ce,kd,hidden,agreement,accuracy")
  args = p.parse_args()
  print(plot(args.workdirs, args.out, args.keys.split(",")))


if __name__ == "__main__":
  main()
