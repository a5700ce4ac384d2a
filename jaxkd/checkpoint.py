"""Orbax checkpoints of a run: the student's parameters, optimizer state, step and data position.

Never the teacher: it is an input of the run, read from its own folder every time. Saves are
asynchronous (training goes on while arrays are written); Orbax writes each step into a temporary
directory and renames it when complete, so an interrupted save is never taken for a finished one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxkd.step import TrainState


class Checkpointer:
  """`CheckpointManager` over `workdir/checkpoints` with items state (arrays), data and meta (JSON)."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, data_state: dict, meta: dict, *, step: int) -> None:
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict, dict]:
    """Restores `step` straight onto the shardings carried by `abstract_state`'s ShapeDtypeStructs."""
    target = {"step": abstract_state.step, "params": abstract_state.params, "opt_state": abstract_state.opt_state}
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    tree = out["state"]
    return TrainState(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"]), out["data"], \
        out["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` placed on `shardings` (a matching tree), for restoring."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def write_json(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
