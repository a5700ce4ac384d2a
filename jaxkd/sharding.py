"""The device mesh, the one table that maps logical axis names onto it, and every sharding made from them.

Layers name logical axes only ("embed", "mlp", "act_batch", ...); `LOGICAL_RULES` is the single place that
says which mesh axis (data, fsdp, tensor) each one is split over. A dimension whose size the mesh axes do
not divide is replicated instead, so tiny test models and odd head counts still shard. The shardings of
parameters (student, projector and teacher alike), optimizer state and batches are made here, and no other
module names a mesh axis: code that needs one asks `mesh_axes_of` for a logical axis.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from flax import nnx
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
    "lora_rank": None,  # LoRA adapters: A [in, rank] and B [rank, out] split like their kernel, never over rank
    # activations
    "act_batch": ("data", "fsdp"),
    "act_seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}

# Every device holds a slice of each parameter and of each batch's rows: the mesh that needs no settings.
FSDP_MESH = {"data": 1, "fsdp": -1, "tensor": 1}


def mesh_axes_of(logical: str) -> tuple[str, ...]:
  """The mesh axes that `LOGICAL_RULES` splits the logical axis `logical` over, in order; () if replicated."""
  if logical not in LOGICAL_RULES:
    raise KeyError(f"logical axis {logical!r} has no entry in jaxkd.sharding.LOGICAL_RULES")
  target = LOGICAL_RULES[logical]
  return (target,) if isinstance(target, str) else tuple(target or ())


# A batch array of any rank ([B, T] ids, [B, A] alignments) is split over its rows only.
BATCH_SPEC = P(mesh_axes_of("act_batch"))


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
  return math.prod(mesh.shape[a] for a in mesh_axes_of("act_batch"))


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
    mesh_axes = mesh_axes_of(axis) if axis is not None else ()
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


def replicated(mesh: Mesh) -> NamedSharding:
  """Whole on every device: the step counter, optimizer counters."""
  return NamedSharding(mesh, P())


def module_shardings(mesh: Mesh, module, which=nnx.Param) -> dict:
  """Nested dict of NamedShardings for a module's parameters (the layout of `nnx.to_pure_dict`); `which`, an nnx
  filter, picks some of them (jaxkd.models.lora: the adapters, or the base weights)."""
  out: dict = {}
  for path, var in nnx.to_flat_state(nnx.state(module, which)):
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = named_sharding(mesh, var.get_metadata().get("axes"), var.shape)
  return out


def opt_state_shardings(mesh: Mesh, abstract_opt_state, param_sh: dict):
  """Optimizer moments follow their parameter's sharding (matched by key path); counters are replicated."""
  flat = {}

  def collect(node, prefix=()):
    for k, v in node.items():
      if isinstance(v, dict):
        collect(v, prefix + (k,))
      else:
        flat[prefix + (k,)] = v
  collect(param_sh)
  counter = replicated(mesh)

  def one(path, leaf):
    keys = tuple(getattr(p, "key", None) for p in path)
    for n in range(len(keys)):
      if keys[n:] in flat:
        return flat[keys[n:]]
    return counter
  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def batch_shardings(mesh: Mesh, keys) -> dict:
  """Every batch array is split over its rows."""
  return {k: NamedSharding(mesh, BATCH_SPEC) for k in keys}
