"""Orbax checkpoints of a run: the student's parameters, optimizer state, step and data position.

Never the teacher: it is an input of the run, read from its own folder every time. Saves are
asynchronous (training goes on while arrays are written). Orbax writes each step into
`<step>.orbax-checkpoint-tmp` and renames it to `<step>` when every file is complete, so a process killed
mid-save leaves only a temporary folder, which is never taken for a checkpoint and is removed on the next
start.

What a checkpoint can be trusted with:
  * It never holds NaN or Inf: `save` checks every array first and refuses (NonFiniteError).
  * It carries a checksum per array (a position-weighted sum of the bit patterns, computed on the devices),
    checked after every restore: a truncated or overwritten file that Orbax reads without complaint is
    still caught.
  * A checkpoint that cannot be restored is named in the log and the next older one is tried; the damaged
    ones are moved to `checkpoints.damaged/` (never deleted). If none restores, the run stops with an
    error instead of starting afresh over a run it could not read.
  * A failed background save (a full disk, an unwritable folder) is raised at the next step, never lost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxkd import distributed
from jaxkd.step import TrainState

log = logging.getLogger("jaxkd")


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be written or read; the message names the folder and what to do."""


class NonFiniteError(FloatingPointError):
  """NaN or Inf where a run cannot go on with it (a checkpoint, or a step under nonfinite="stop")."""


class _MetaHandler(ocp.JsonCheckpointHandler):
  """The `meta` item (JSON). `delay_s` > 0 (config debug.save_delay_s, a test hook) holds every save open
  that long before its last file is written, so a test can kill the process in the middle of a save."""

  def __init__(self, delay_s: float = 0.0):
    super().__init__()
    self.delay_s = float(delay_s)

  async def _save_fn(self, x, directory):
    if self.delay_s > 0:
      await asyncio.sleep(self.delay_s)
    return await super()._save_fn(x, directory)


@ocp.args.register_with_handler(_MetaHandler, for_save=True)
@dataclasses.dataclass
class _MetaSave(ocp.args.JsonSave):
  pass


@ocp.args.register_with_handler(_MetaHandler, for_restore=True)
@dataclasses.dataclass
class _MetaRestore(ocp.args.JsonRestore):
  pass


def _digest(x):
  """uint32 sum of bit patterns weighted by position: a changed, lost or moved element changes it."""
  if x.dtype.itemsize not in (1, 2, 4):
    return jnp.uint32(0)
  uint = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  if x.dtype == jnp.bool_:  # (the optimizer's last-update-finite flag) bitcast refuses bools
    x = x.astype(jnp.uint8)
  bits = jax.lax.bitcast_convert_type(x, uint).astype(jnp.uint32)
  # Flat index from per-axis iotas: no reshape, so a sharded array is never gathered.
  index = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(x.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride % 2 ** 32)
    stride *= x.shape[d]
  weight = index * jnp.uint32(2654435761) + jnp.uint32(1)
  return jnp.sum(bits * weight, dtype=jnp.uint32)


def _finite(x):
  return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)


@jax.jit
def _inspect(tree):
  return jax.tree.map(_digest, tree), jax.tree.map(_finite, tree)


def inspect(tree) -> tuple[dict[str, int], list[str]]:
  """({array path: checksum}, [paths of arrays holding NaN or Inf]) of a pytree of arrays."""
  digests, finite = jax.device_get(_inspect(tree))
  paths = lambda t: {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  return {k: int(v) for k, v in paths(digests).items()}, [k for k, ok in paths(finite).items() if not ok]


def _tree(state: TrainState) -> dict:
  """What a checkpoint holds of a TrainState: every field but an absent sampling key (no on-policy steps)."""
  tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
  if state.rng is not None:
    tree["rng"] = state.rng
  return tree


class Checkpointer:
  """`CheckpointManager` over `workdir/checkpoints` with items state (arrays), data and meta (JSON)."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
               save_delay_s: float = 0.0):
    self.directory = os.path.abspath(directory)
    self.damaged_dir = self.directory + ".damaged"
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True, cleanup_tmp_directories=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "meta": _MetaHandler(save_delay_s)}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._saving: int | None = None  # the step of a save that may still be running in the background

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # -- saving ---------------------------------------------------------------------------------------------

  def save(self, state: TrainState, data_states: list, meta: dict, *, step: int) -> None:
    """Starts writing `step` in the background; `data_states` holds every process's data position."""
    self.raise_if_failed(wait=True)
    tree = _tree(state)
    checksums, nonfinite = inspect(tree)
    if nonfinite:
      raise NonFiniteError(
          f"not saving step {step}: {len(nonfinite)} array(s) hold NaN or Inf, e.g. {nonfinite[:3]}; a "
          f"checkpoint must never hold them. The last good checkpoint is step {self.latest_step()} in "
          f"{self.directory}")
    meta = {**meta, "step": step, "checksums": checksums}
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(tree), data=ocp.args.JsonSave({"processes": list(data_states)}),
          meta=_MetaSave(meta)), force=True)
    except Exception as e:  # noqa: BLE001  (re-raised with the folder and what is intact)
      raise self._save_error(step, e) from e
    self._saving = step

  def raise_if_failed(self, *, wait: bool = False) -> None:
    """Raises CheckpointError if the background save failed. Without `wait` it only looks (cheap, once a
    step); with it, it waits for the save to end."""
    if self._saving is None:
      return
    if not wait and self.manager.is_saving_in_progress():
      return
    step, self._saving = self._saving, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001  (re-raised with the folder and what is intact)
      raise self._save_error(step, e) from e

  def _save_error(self, step: int, e: Exception) -> CheckpointError:
    self.manager.reload()
    kept = self.all_steps()
    return CheckpointError(
        f"saving checkpoint step {step} into {self.directory} failed: {type(e).__name__}: {e}. The finished "
        f"checkpoints {kept or '(none)'} are intact; fix the cause (free disk space, check permissions) and "
        "rerun the same command to resume" + (f" from step {kept[-1]}" if kept else ""))

  def wait(self) -> None:
    """Waits for the background save; raises CheckpointError if it failed."""
    self.raise_if_failed(wait=True)

  def close(self) -> None:
    self.wait()
    self.manager.close()

  # -- restoring ------------------------------------------------------------------------------------------

  def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, list, dict]:
    """Restores `step` straight onto the shardings carried by `abstract_state`'s ShapeDtypeStructs and checks
    it against the checksums saved with it; returns (state, every process's data position, meta)."""
    target = _tree(abstract_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=_MetaRestore()))
    tree, meta = out["state"], out["meta"]
    saved = meta.get("checksums")
    if saved is not None:
      now, _ = inspect(tree)
      wrong = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
      if wrong:
        raise CheckpointError(f"{len(wrong)} restored array(s) differ from the checksums saved with them, e.g. "
                              f"{wrong[:3]}: the files were changed or cut short after the save")
    data = out["data"]
    states = data["processes"] if isinstance(data, dict) and "processes" in data else [data]
    return TrainState(**tree), states, meta

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=_MetaRestore()))["meta"]

  def restore_latest(self, abstract_state: TrainState) -> tuple[int, TrainState, list, dict] | None:
    """(step, state, data positions, meta) of the newest checkpoint that restores; None without any.

    A checkpoint that fails is named in the log and the next older one is tried. Once one restores, the
    newer damaged ones are moved to `checkpoints.damaged/` (kept, but out of the way of the steps about to
    be saved again). If none restores, CheckpointError: never a silent fresh start.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      return None
    failed: list[tuple[int, str]] = []
    for step in steps:
      try:
        restored, error = self.restore(step, abstract_state), None
      except Exception as e:  # noqa: BLE001  (any failure to read means: try the previous checkpoint)
        restored, error = None, e
      if distributed.all_true(error is None):
        if failed:
          moved = self._set_aside([s for s, _ in failed])
          log.warning("resuming from checkpoint step %d, the newest one that restores; the damaged %s moved "
                      "to %s", step, ", ".join(moved), self.damaged_dir)
        state, data, meta = restored
        return step, state, data, meta
      why = f"{type(error).__name__}: {_first_line(error)}" if error is not None else "failed on another process"
      log.error("checkpoint %s is damaged and cannot be restored (%s); trying the previous one",
                self.step_dir(step), why)
      failed.append((step, why))
    details = "\n".join(f"  {self.step_dir(s)}: {why}" for s, why in failed)
    layout = ""
    # Orbax words it two ways: a tree with other keys, or one with other nesting.
    if any(("tree structures do not match" in why or "Structure mismatch" in why) for _, why in failed):
      layout = ("A state whose tree does not match was most likely written by another jaxkd version (the "
                "optimizer state gained its count of skipped updates in December 2026), not damaged: resume "
                "it with the version that wrote it. ")
    raise CheckpointError(
        f"{self.directory} holds checkpoints {sorted(steps)} but none of them can be restored:\n{details}\n"
        f"{layout}Nothing was changed or deleted. Restore a good copy of one of them, or move the folder away "
        "(or use another workdir) to start afresh.")

  def _set_aside(self, steps: list[int]) -> list[str]:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    names = [f"{s}-{stamp}" for s in steps]
    if distributed.is_main():
      os.makedirs(self.damaged_dir, exist_ok=True)
      for s, name in zip(steps, names):
        os.rename(self.step_dir(s), os.path.join(self.damaged_dir, name))
    distributed.barrier("jaxkd:set_aside_damaged_checkpoints")
    self.manager.reload()
    return [f"step {s}" for s in steps]


def _first_line(e: BaseException, limit: int = 300) -> str:
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return text if len(text) <= limit else text[:limit] + "..."


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` placed on `shardings` (a matching tree), for restoring."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def write_json(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
