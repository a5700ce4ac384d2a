"""Where a run's numbers go: `metrics.jsonl`, TensorBoard event files, a progress bar and a final table.

Only process 0 writes. `metrics.jsonl` is the record (one JSON line per logged step, eval lines with an
`eval_` prefix); TensorBoard files sit beside it in `workdir/tensorboard`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import jax

log = logging.getLogger("jaxkd")

# Shown on the progress bar, in this order, when present.
BAR_KEYS = ("loss", "kd", "ce", "hidden", "tokens_per_s")


class Reporter:
  """Writes step and eval metrics; `close()` prints the summary table."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, log_every: int, progress: bool = True):
    self.main = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.log_every, self.total, self.start = log_every, total_steps, start_step
    self.first: dict | None = None
    self.last: dict | None = None
    self.last_eval: dict | None = None
    self.started = time.time()
    self.tokens = 0.0
    self._file = self._tb = self._bar = None
    if not self.main:
      return
    truncate_after(self.path, start_step)
    self._file = open(self.path, "a")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)
    except ImportError:  # optional: metrics.jsonl has everything
      log.warning("tensorboardX is not installed: no TensorBoard files (pip install tensorboardX)")
    if progress:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                       file=sys.stderr, disable=not sys.stderr.isatty() and os.environ.get("JAXKD_PROGRESS") != "1")

  def step(self, step: int, values: dict) -> None:
    self.tokens += values.get("tokens", 0.0)
    self.first = self.first or {"step": step, **values}
    self.last = {"step": step, **values}
    if not self.main:
      return
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix({k: f"{values[k]:.4g}" for k in BAR_KEYS if k in values}, refresh=False)
    if step % self.log_every == 0 or step == self.total:
      self._file.write(json.dumps({"step": step, **values}) + "\n")
      self._file.flush()
      if self._tb is not None:
        for k, v in values.items():
          self._tb.add_scalar(f"train/{k}", v, step)
      if self._bar is None:
        log.info("step %d  %s", step, "  ".join(f"{k}={v:.4g}" for k, v in values.items()))

  def eval(self, step: int, values: dict) -> None:
    self.last_eval = {"step": step, **values}
    if not self.main:
      return
    self._file.write(json.dumps({"step": step, **{f"eval_{k}": v for k, v in values.items()}}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(f"eval/{k}", v, step)
    log.info("eval at step %d  %s", step, "  ".join(f"{k}={v:.4g}" for k, v in values.items()))

  def close(self) -> str:
    """Closes the files and returns (and logs) the summary table."""
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._file is not None:
      self._file.close()
    table = self.table()
    if self.main and table:
      log.info("\n%s", table)
    return table

  def table(self) -> str:
    rows = []
    if self.first and self.last:
      for key in ("loss", "ce", "kd", "hidden", "agreement", "grad_norm"):
        if key in self.last:
          rows.append((f"train {key}", f"{self.first[key]:.4f} (step {self.first['step']})",
                       f"{self.last[key]:.4f} (step {self.last['step']})"))
      elapsed = time.time() - self.started
      rows.append(("trained tokens / s", "", f"{self.tokens / max(elapsed, 1e-9):.0f}"))
    if self.last_eval:
      for key in ("loss", "perplexity", "accuracy", "agreement", "kl_t1", "hidden"):
        if key in self.last_eval:
          rows.append((f"held-out {key}", "", f"{self.last_eval[key]:.4f} (step {self.last_eval['step']})"))
    if not rows:
      return ""
    w = [max(len(r[i]) for r in rows + [("metric", "first", "last")]) for i in range(3)]
    line = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"
    return "\n".join([line(("metric", "first", "last")), "|" + "|".join("-" * (x + 2) for x in w) + "|"]
                     + [line(r) for r in rows])


def truncate_after(path: str, step: int, *, evals_at_step: bool = True) -> None:
  """Drops lines past `step`: the steps after the last checkpoint are run and logged again on resume.

  Also drops a last line cut short by a killed process, and with `evals_at_step=False` the eval lines at
  `step` itself (a finished run's final evaluation, which a rerun repeats).
  """
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # blank, or torn by kill -9 in the middle of a write
        continue
      is_eval = any(k.startswith("eval_") for k in row)
      if row["step"] < step or (row["step"] == step and (evals_at_step or not is_eval)):
        keep.append(line if line.endswith("\n") else line + "\n")
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


def read_metrics(workdir: str) -> tuple[list[dict], list[dict]]:
  """(train lines, eval lines) of a run's metrics.jsonl."""
  train, evals = [], []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        (evals if any(k.startswith("eval_") for k in row) else train).append(row)
  return train, evals
