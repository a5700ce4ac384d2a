"""A run's workdir and its identity: which settings define a run, and whether a workdir holds another one.

A workdir holds one run: its checkpoints and the config that made them (`config.json`, and each
checkpoint's own copy). Rerunning the same command resumes it; a config that would compute something else is
refused, naming the settings that differ, or (overwrite=True) the old run is moved aside. Nothing is deleted.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable

from flax import traverse_util

from jaxkd import config_base, distributed
from jaxkd.config_base import ConfigError

log = logging.getLogger("jaxkd")

# Settings that do not change what a run computes: its bookkeeping, where it runs and on how many devices
# (a checkpoint restores onto any mesh), the non-finite policy and test hooks. A workdir's run may be
# resumed with other values of these; any other difference is a different run. `steps` joins the identity
# when the learning-rate schedule decays over it (cosine, linear): changing it mid-run would change every
# later learning rate, so only a constant schedule can be extended.
NOT_IDENTITY = ("workdir", "log_every", "progress", "checkpoint_every", "max_to_keep", "eval_every", "overwrite",
                "nonfinite", "export.", "debug.", "distributed.", "mesh.", "data.cache_dir", "data.num_workers",
                "data.encode_chunk", "data.prefetch", "data.eval_batches", "samples.", "aot.", "capture.",
                # how the same numbers are computed: a run may resume on another chip or memory budget
                "student.attention", "teacher.attention", "student.remat")


def config_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())


def run_identity(cfg: dict, *, with_steps: bool) -> dict:
  """The settings of a config dict that define its run (see NOT_IDENTITY), flattened to dotted keys."""
  flat = {k: v for k, v in traverse_util.flatten_dict(cfg, sep=".").items()
          if not any(k == n or (n.endswith(".") and k.startswith(n)) for n in NOT_IDENTITY)}
  if not with_steps:
    flat.pop("steps", None)
  if not flat.get("distill.on_policy.fraction"):  # no step samples: how it would sample changes nothing
    flat = {k: v for k, v in flat.items() if not k.startswith("distill.on_policy.") or k.endswith(".fraction")}
  return flat


def config_diff(stored: dict, current: dict) -> list[tuple[str, Any, Any]]:
  """[(key, stored value, current value)] of the identity settings that differ. A setting the stored run's jaxkd
  did not have yet (added since) is the same when it holds its default, which keeps what that jaxkd did."""
  decays = lambda cfg: cfg.get("optimizer", {}).get("schedule", "cosine") != "constant"
  with_steps = decays(stored) or decays(current)
  a, b = run_identity(stored, with_steps=with_steps), run_identity(current, with_steps=with_steps)
  same = lambda x, y: json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)
  defaults = traverse_util.flatten_dict(config_dict(config_base.base_config()), sep=".")
  added = {k for k in set(b) - set(a) if k in defaults and same(b[k], defaults[k])}
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in added and not same(a.get(k), b.get(k))]


def stored_config(workdir: str, ckpt) -> tuple[dict, str] | None:
  """(config dict, where it was read) of the run already in `workdir`, or None for a new workdir."""
  path = os.path.join(workdir, "config.json")
  if not ckpt.all_steps():
    return None  # a run that ended before its first checkpoint: nothing to resume, so nothing to protect
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f), path
  for step in reversed(ckpt.all_steps()):  # a workdir from before config.json, or one that lost it
    try:
      meta = ckpt.read_meta(step)
    except Exception:  # noqa: BLE001  (a damaged checkpoint: the restore reports it)
      continue
    if "config" in meta:
      return meta["config"], ckpt.step_dir(step)
  return None


def claim(workdir: str, config, ckpt, reopen: Callable[[], Any]):
  """The checkpointer of `workdir` for a run of `config`: `ckpt` when the workdir is new or holds a run of
  the same config. A run of another config is refused (ConfigError naming the settings that differ), or with
  overwrite=True moved to `<workdir>.replaced-<time>`, and `reopen()` gives the new, empty checkpointer."""
  stored = stored_config(workdir, ckpt)
  if stored is None:
    return ckpt
  diff = config_diff(stored[0], config_dict(config))
  if not diff:
    return ckpt
  shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diff[:8]) + ("; ..." if len(diff) > 8 else "")
  if any(k == "steps" for k, _, _ in diff):
    shown += (" (steps is part of a run whose learning rate decays over it: changing it mid-run would change "
              "every later learning rate; only optimizer.schedule=\"constant\" runs can be extended)")
  if not config.overwrite:
    raise ConfigError(
        f"workdir {workdir} holds a run of a different config ({stored[1]}): {len(diff)} setting(s) differ: "
        f"{shown}. Resume it with its own settings, use another workdir, or set overwrite=True to move the old "
        f"run to {workdir}.replaced-<time> and start afresh")
  aside = f"{workdir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
  ckpt.close()
  if distributed.is_main():
    os.rename(workdir, aside)
    os.makedirs(workdir)
  distributed.barrier("jaxkd:overwrite")
  log.warning("overwrite=True: the run of a different config in %s (%s) was moved to %s; starting afresh",
              workdir, shown, aside)
  return reopen()
