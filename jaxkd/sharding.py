"""The device mesh and the one table that maps logical axis names onto it.

Layers name logical axes only ("embed", "mlp", "act_batch", ...); `LOGICAL_RULES` is the single place that
says which mesh axis (data, fsdp, tensor) each one is split over. A dimension whose size the mesh axes do
not divide is replicated instead, so tiny test models and odd head counts still shard.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "heads": None,  # per-head norm weights: tiny, replicated
    "head_dim": None,
    "teacher_embed": "tensor",  # output width of the hidden-state projection
    # activations
    "act_batch": ("data", "fsdp"),
    "act_seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def make_mesh(shape: dict[str, int] | Sequence[int], devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(shape[a]) for a in MESH_AXES] if isinstance(shape, dict) else [int(s) for s in shape]
  if len(sizes) != len(MESH_AXES):
    raise ValueError(f"mesh shape {sizes} needs one size per axis {MESH_AXES}")
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  if -1 in sizes:
    rest = math.prod(s for s in sizes if s != -1)
    if len(devices) % rest:
      raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // rest
  if math.prod(sizes) != len(devices):
    raise ValueError(
        f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but {len(devices)} are "
        f"visible; set mesh.data/mesh.fsdp/mesh.tensor so their product is {len(devices)} (or use -1)")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def batch_shards(mesh: Mesh) -> int:
  """How many ways a batch's rows are split (the mesh axes of "act_batch"): the batch must divide by it."""
  axes = LOGICAL_RULES["act_batch"]
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def batch_problem(mesh: Mesh, rows: int, name: str, alternative: str) -> str:
  """Why a batch of `rows` rows (set by `name`) cannot be split over `mesh`, or ""."""
  shards = batch_shards(mesh)
  if rows % shards == 0:
    return ""
  return (f"{name}={rows} is not divisible by {shards}, the mesh's data x fsdp ({dict(mesh.shape)}) over which "
          f"each batch's rows are split; use a multiple of {shards}, or {alternative}")


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
  """PartitionSpec for logical `axes`; with `shape` and `mesh`, dims the mesh cannot divide are replicated."""
  names = set(mesh.axis_names) if mesh is not None else None
  used: set[str] = set()
  spec = []
  for i, axis in enumerate(axes):
    target = LOGICAL_RULES.get(axis) if axis is not None else None
    if axis is not None and axis not in LOGICAL_RULES:
      raise KeyError(f"logical axis {axis!r} has no entry in jaxkd.sharding.LOGICAL_RULES")
    mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
    # A mesh axis may split only one dimension, and only axes the mesh has (size 1 ones are harmless).
    mesh_axes = tuple(a for a in mesh_axes if a not in used and (names is None or a in names))
    if mesh is not None and shape is not None and mesh_axes:
      if shape[i] % math.prod(mesh.shape[a] for a in mesh_axes):
        mesh_axes = ()
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
  return P(*spec)


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation, when tracing under a mesh (`jax.set_mesh`); else a no-op."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def param_shardings(mesh: Mesh, state):
  """NamedSharding per parameter of an nnx State, from each Param's `axes` metadata."""
  def one(var):
    axes = var.get_metadata().get("axes") or (None,) * len(var.shape)
    return named_sharding(mesh, axes, var.shape)
  return jax.tree.map(one, state, is_leaf=lambda v: hasattr(v, "get_metadata"))
