"""Hugging Face folders in and out: config.json + safetensors -> sharded `Transformer`, and back.

Loading builds the model abstractly (`nnx.eval_shape`, nothing allocated), then creates each parameter
with `jax.make_array_from_callback`: every device shard is read straight from the safetensors files
(only the rows it needs), transposed and cast, so the model is never held whole twice in host memory. Every
tensor name and shape is checked against the config before any weight is read; pickle files are never
opened and remote code is never run.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from jaxkd import sharding as shd
from jaxkd.models import llama, lora as lora_lib, qwen2, qwen3, stablelm
from jaxkd.models import quantize as quantize_lib
from jaxkd.models.config import ModelConfig, UnsupportedConfigError, torch_dtype_of
from jaxkd.models.safetensors_io import WeightsError, SafetensorsFile, write_file
from jaxkd.models.transformer import Transformer

FAMILIES = {m.MODEL_TYPE: m for m in (qwen2, qwen3, llama, stablelm)}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Checkpoint entries that carry no parameter: old rotary buffers.
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")
PICKLE_GLOBS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
DEFAULT_SHARD_BYTES = 5 * 2**30


# ----------------------------------------------------------------------------------------------------
# Configs.


def config_from_hf(hf: dict) -> ModelConfig:
  """ModelConfig from a config.json dict of a supported family (errors name what is unsupported)."""
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    raise UnsupportedConfigError(
        f"config.json model_type={model_type!r} is not supported; jaxkd ports {sorted(FAMILIES)}")
  return FAMILIES[model_type].from_hf_config(hf)


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict:
  family = FAMILIES[cfg.model_type]
  return {
      "architectures": [family.ARCHITECTURE],
      "model_type": cfg.model_type,
      "vocab_size": cfg.vocab_size,
      "tie_word_embeddings": cfg.tie_embeddings,
      "initializer_range": cfg.initializer_range,
      "torch_dtype": dtype,
      **cfg.passthrough(),
      **family.to_hf_config(cfg),
  }


def read_config(folder: str) -> dict:
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise WeightsError(f"{folder} has no config.json; point to a Hugging Face model folder")
  with open(path) as f:
    return json.load(f)


def resolve_dtype(dtype: Any, hf: dict | None = None):
  if dtype == "auto":
    dtype = torch_dtype_of(hf or {}) or "float32"
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]
  return jnp.dtype(dtype).type


# ----------------------------------------------------------------------------------------------------
# Finding the files.


def resolve_folder(path: str) -> str:
  """A local folder as is; otherwise a hub id, from the local cache or (when online) downloaded."""
  if os.path.isdir(path):
    return path
  looks_like_id = re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None and not path.startswith((".", "/"))
  if not looks_like_id:
    raise FileNotFoundError(f"model folder {path!r} does not exist (and is not a hub id like 'Qwen/Qwen2-1.5B')")
  import huggingface_hub  # pylint: disable=import-outside-toplevel

  patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
  try:
    return huggingface_hub.snapshot_download(path, allow_patterns=patterns, local_files_only=True)
  except Exception:  # not cached: try the hub
    pass
  try:
    return huggingface_hub.snapshot_download(path, allow_patterns=patterns)
  except Exception as e:
    raise FileNotFoundError(
        f"{path!r} is not a local folder and could not be fetched from the Hugging Face hub "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Offline? Download it where there "
        f"is a network with `huggingface-cli download {path} --local-dir DIR` and pass DIR.") from e


def weight_files(folder: str) -> dict[str, str]:
  """Tensor name -> safetensors file, from the index or the single file; refuses pickle checkpoints."""
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    for shard in sorted(set(weight_map.values())):
      if not os.path.exists(os.path.join(folder, shard)):
        raise WeightsError(f"{index} lists shard {shard}, which is not in {folder}; download the missing file")
    return {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
  single = os.path.join(folder, "model.safetensors")
  if os.path.exists(single):
    return {name: single for name in SafetensorsFile(single).names()}
  pickles = [p for g in PICKLE_GLOBS for p in glob.glob(os.path.join(folder, g))]
  if pickles:
    raise WeightsError(
        f"{folder} holds only pickle weights ({os.path.basename(pickles[0])}); jaxkd never unpickles files, "
        "which can run arbitrary code. Convert them to safetensors (transformers: load the model and call "
        "save_pretrained(dir, safe_serialization=True)) or use the model's safetensors release")
  raise WeightsError(f"{folder} has no model.safetensors or model.safetensors.index.json")


# ----------------------------------------------------------------------------------------------------
# The name table: our parameter paths <-> HF tensor names.


def _stack_dims(template: str) -> int:
  return template.count("{layer}") + template.count("{head}")


def hf_entries(template: str, shape: tuple[int, ...]):
  """Yields (index into our stacked param, HF name) for every tensor a table row covers."""
  n = _stack_dims(template)
  keys = ["layer", "head"][:n] if "{layer}" in template else ["head"][:n]
  for idx in itertools.product(*(range(s) for s in shape[:n])):
    yield idx, template.format(**dict(zip(keys, idx)))


def hf_shape(path: str, template: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  rest = tuple(shape[_stack_dims(template):])
  return rest[::-1] if path.endswith("kernel") else rest


def _table(cfg: ModelConfig, flat_params) -> dict[str, str]:
  table = FAMILIES[cfg.model_type].WEIGHT_NAMES
  missing = [p for p, _ in flat_params if p not in table]
  if missing:
    raise KeyError(f"no HF name for parameters {missing} in the {cfg.model_type} WEIGHT_NAMES table")
  return {p: table[p] for p, _ in flat_params}


def _flat_params(model) -> list[tuple[str, Any]]:
  """(path, Variable) of the parameters a Hugging Face folder holds: all but LoRA adapters and an int8 kernel's
  scales (made from the kernel, not read)."""
  return [(".".join(map(str, k)), v) for k, v in nnx.to_flat_state(nnx.state(model, lora_lib.BASE))
          if not isinstance(v, quantize_lib.Scale)]


def _export_values(model, flat) -> dict[str, Any]:
  """path -> a function giving the parameter's value as exported: with a LoRA adapter beside a kernel, the two
  merged (W + scale * A @ B, jaxkd.models.lora), one kernel at a time."""
  adapters = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(model, lora_lib.ADAPTERS))}
  out = {}
  for path, var in flat:
    a, b = adapters.get(path[:-len("kernel")] + "lora_a"), adapters.get(path[:-len("kernel")] + "lora_b")
    if path.endswith("kernel") and a is not None:
      out[path] = (lambda var=var, a=a, b=b: lora_lib.merged_kernel(var.get_value(), a.get_value(), b.get_value(),
                                                                    model.lora.scale))
    else:
      out[path] = var.get_value
  return out


# ----------------------------------------------------------------------------------------------------
# Loading.


def _check_names_and_shapes(cfg, folder, table, flat, files: dict[str, str]):
  expected = {}
  for path, var in flat:
    for _, name in hf_entries(table[path], var.shape):
      expected[name] = hf_shape(path, table[path], var.shape)
  missing = sorted(set(expected) - set(files))
  unexpected = sorted(n for n in set(files) - set(expected) if not IGNORED.match(n)
                      and not (cfg.tie_embeddings and n == "lm_head.weight"))
  if missing:
    raise WeightsError(
        f"{folder}: {len(missing)} weight(s) that config.json implies are missing from the checkpoint, e.g. "
        f"{missing[:4]}; the weights and config.json do not belong together (or a shard is incomplete)")
  if unexpected:
    raise WeightsError(
        f"{folder}: {len(unexpected)} unexpected weight(s) in the checkpoint, e.g. {unexpected[:4]}; they "
        "would be silently dropped, which means config.json does not describe these weights (check "
        "attention_bias, use_qkv_bias, qk_layernorm, tie_word_embeddings, num_hidden_layers)")
  readers = {f: SafetensorsFile(f) for f in sorted(set(files[n] for n in expected))}
  for name, want in expected.items():
    if name not in readers[files[name]]:
      raise _not_in_shard(folder, name, files[name])
    got = readers[files[name]].shape(name)
    if tuple(got) != tuple(want):
      raise WeightsError(
          f"{files[name]}: weight {name} has shape {tuple(got)} but config.json implies {tuple(want)}; "
          "the weights and config.json do not belong together")
  if cfg.tie_embeddings and "lm_head.weight" in files:
    _check_tied_head(folder, files, table["embed_tokens.embedding"], readers)
  return readers


def _not_in_shard(folder: str, name: str, shard: str) -> WeightsError:
  return WeightsError(
      f"{folder}: model.safetensors.index.json maps weight {name} to {os.path.basename(shard)}, which does not "
      "hold it; the index and the shards do not belong together (re-download them together)")


def _check_tied_head(folder: str, files: dict[str, str], embed_name: str, readers: dict,
                     rows_per_read: int = 8192) -> None:
  """A tied config whose checkpoint also holds lm_head.weight: fine if it is a copy of the embedding table.

  If it differs, transformers 5 unties the two and uses it, while a tied model would drop it: every logit
  would differ from the model these weights were trained as, so refuse rather than pick one silently.
  """
  embed = readers[files[embed_name]]  # the checked weights' files are open already; lm_head's may not be
  head = readers.get(files["lm_head.weight"]) or SafetensorsFile(files["lm_head.weight"])
  if "lm_head.weight" not in head:
    raise _not_in_shard(folder, "lm_head.weight", files["lm_head.weight"])
  problem = ""
  if head.shape("lm_head.weight") != embed.shape(embed_name):
    problem = f"has shape {head.shape('lm_head.weight')}, not the shape {embed.shape(embed_name)} of {embed_name}"
  else:
    for start in range(0, head.shape("lm_head.weight")[0], rows_per_read):
      rows = slice(start, start + rows_per_read)
      a = head.read("lm_head.weight", rows).astype(np.float32)
      b = embed.read(embed_name, rows).astype(np.float32)
      if not np.array_equal(a, b):
        problem = f"differs from {embed_name} (first in rows {start}-{start + len(a) - 1})"
        break
  if problem:
    raise WeightsError(
        f"{folder}: config.json sets tie_word_embeddings=true, but the checkpoint also holds lm_head.weight, "
        f"which {problem}. Tied, the embedding table would be the output head and lm_head.weight "
        "would be dropped (transformers 5 unties them and uses lm_head.weight instead). Set "
        "tie_word_embeddings to false in config.json if lm_head.weight is the trained output head, or delete "
        "lm_head.weight from the checkpoint if the embedding table is")


def load_params(model, folder: str, *, mesh: Mesh | None = None) -> None:
  """Fills the (abstract) parameters of `model` from the safetensors in `folder`, in place."""
  cfg = model.cfg
  flat = _flat_params(model)
  table = _table(cfg, flat)
  files = weight_files(folder)
  readers = _check_names_and_shapes(cfg, folder, table, flat, files)
  device = SingleDeviceSharding(jax.devices()[0])
  int8 = quantize_lib.quantized_kernels(model)

  for path, var in flat:
    template, shape, dtype = table[path], tuple(var.shape), np.dtype(var.dtype)
    if path in int8:  # read as the float model would hold it, then quantised where it lives
      dtype = np.dtype(int8[path].float_dtype)
    axes = var.get_metadata().get("axes")
    sharding = shd.named_sharding(mesh, axes, shape) if mesh is not None else device
    n_stack, transpose = _stack_dims(template), path.endswith("kernel")

    def shard(index, template=template, shape=shape, dtype=dtype, n_stack=n_stack, transpose=transpose):
      index = tuple(index) + (slice(None),) * (len(shape) - len(index))
      stack_ranges = [range(*index[d].indices(shape[d])) for d in range(n_stack)]
      inner = index[n_stack:]
      out = np.empty([len(r) for r in stack_ranges] + [len(range(*s.indices(shape[n_stack + i])))
                                                       for i, s in enumerate(inner)], dtype)
      keys = ["layer", "head"][:n_stack] if "{layer}" in template else ["head"][:n_stack]
      for pos, idx in zip(itertools.product(*(range(len(r)) for r in stack_ranges)),
                          itertools.product(*stack_ranges)):
        name = template.format(**dict(zip(keys, idx)))
        reader = readers[files[name]]
        if transpose:  # HF [out, in]: read only our `out` columns' rows
          rows = reader.read(name, inner[1] if len(inner) > 1 else slice(None))
          out[pos] = rows.T[inner[0]]
        else:
          rows = reader.read(name, inner[0] if inner else slice(None))
          out[pos] = rows[(slice(None),) + tuple(inner[1:])]
      return out

    value = jax.make_array_from_callback(shape, sharding, shard)
    if path in int8:  # only this one float kernel is on the devices beside the int8 ones
      value, scale = quantize_lib.quantize_value(value, axes)
      int8[path].scale.set_value(scale)
    var.set_value(value)


def from_pretrained(path: str, *, dtype: Any = "float32", compute_dtype: Any = None, mesh: Mesh | None = None,
                    remat: str = "none", attention: str = "auto", lora: lora_lib.LoraConfig | None = None,
                    seed: int = 0, quantize: str = "") -> Transformer:
  """Loads a Qwen2, Qwen3, Llama or StableLM model from a local HF folder (or a cached/downloadable hub id).

  Args:
    path: folder with config.json and model.safetensors (or sharded files with their index).
    dtype: parameter dtype, "float32", "bfloat16", "float16" or "auto" (the checkpoint's own).
    compute_dtype: activation dtype; defaults to `dtype`.
    mesh: place each parameter on its NamedSharding from the logical-axis rules; None = first device.
    remat: rematerialisation policy of the scanned layers (see transformer.REMAT_POLICIES).
    attention: "auto", "xla", "cudnn" or "splash" (see jaxkd.models.attention).
    lora: LoRA adapters to add to the loaded weights (jaxkd.models.lora.LoraConfig), initialised from `seed` as
      a model built with `nnx.Rngs(seed)` has them: A random, B zero, so the model computes what the folder's does.
    quantize: "int8" stores the decoder's linear layers as int8 with per-channel scales, quantised as they are
      read (see jaxkd.models.quantize); "" keeps them in `dtype`.
  """
  folder = resolve_folder(path)
  hf = read_config(folder)
  cfg = config_from_hf(hf)
  param_dtype = resolve_dtype(dtype, hf)
  compute = resolve_dtype(compute_dtype, hf) if compute_dtype is not None else param_dtype
  make = lambda rngs: Transformer(cfg, param_dtype=param_dtype, dtype=compute, remat=remat, attention=attention,
                                  lora=lora, rngs=rngs)
  model = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
  quantize_lib.quantize(model, quantize)
  load_params(model, folder, mesh=mesh)
  if lora is not None:
    # The adapters of a whole model built from `seed`: XLA drops the base weights' initialisation, never used.
    out = (shd.module_shardings(mesh, model, lora_lib.ADAPTERS) if mesh is not None else
           SingleDeviceSharding(jax.devices()[0]))
    adapters = jax.jit(lambda: nnx.to_pure_dict(nnx.state(make(nnx.Rngs(seed)), lora_lib.ADAPTERS)),
                       out_shardings=out)()
    state = nnx.state(model, lora_lib.ADAPTERS)
    nnx.replace_by_pure_dict(state, adapters)
    nnx.update(model, state)
  return model


# ----------------------------------------------------------------------------------------------------
# Export.


def _host_array(value) -> np.ndarray:
  if not value.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    value = multihost_utils.process_allgather(value, tiled=True)
  return np.asarray(jax.device_get(value))


def save_pretrained(model: Transformer, path: str, tokenizer=None, *, dtype: str | None = None,
                    max_shard_size: int = DEFAULT_SHARD_BYTES) -> str:
  """Writes an HF folder (config.json, safetensors shards with an index when above `max_shard_size`,
  tokenizer files when given) that `transformers.AutoModelForCausalLM.from_pretrained` loads. A LoRA model's
  adapters are merged into their kernels (`save_adapter` writes them apart, as PEFT does).

  The folder is written beside `path` and moved into place at the end, so an interrupted export never
  leaves a half-written model where a finished one was.
  On several processes every process must call it; only process 0 writes.
  """
  if quantize_lib.is_quantized(model):
    raise ValueError("save_pretrained: this model's linear layers are int8 (a quantised teacher); export the model "
                     "it was loaded from instead")
  cfg = model.cfg
  flat = _flat_params(model)
  table = _table(cfg, flat)
  out_dtype = np.dtype(resolve_dtype(dtype)) if dtype else np.dtype(flat[0][1].get_value().dtype)
  dtype_name = {np.dtype(v): k for k, v in DTYPES.items()}[out_dtype]
  writing = jax.process_index() == 0

  # Plan the shards from shapes alone, then stream: one stacked parameter on the host at a time.
  plan = []  # (hf name, param path, index, hf shape)
  for p, var in flat:
    for idx, name in hf_entries(table[p], tuple(var.shape)):
      plan.append((name, p, idx, hf_shape(p, table[p], tuple(var.shape))))
  groups, size = [[]], 0
  for entry in plan:
    nbytes = int(np.prod(entry[3])) * out_dtype.itemsize
    if groups[-1] and size + nbytes > max_shard_size:
      groups.append([])
      size = 0
    groups[-1].append(entry)
    size += nbytes
  values = _export_values(model, flat)
  cache: dict[str, np.ndarray] = {}

  def tensors(group):
    for _, p, idx, _ in group:
      if p not in cache:
        cache.clear()
        cache[p] = _host_array(values[p]()).astype(out_dtype)
      t = cache[p][idx]
      yield t.T if p.endswith("kernel") else t

  parent = os.path.dirname(os.path.abspath(path)) or "."
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".export-", dir=parent) if writing else None
  names = (["model.safetensors"] if len(groups) == 1 else
           [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
  for file_name, group in zip(names, groups):
    specs = [(name, out_dtype, shape) for name, _, _, shape in group]
    if writing:
      write_file(os.path.join(tmp, file_name), specs, tensors(group))
    else:  # other processes still take part in the gathers
      for _ in tensors(group):
        pass
  cache.clear()
  if not writing:
    return path
  if len(groups) > 1:
    weight_map = {e[0]: f for f, g in zip(names, groups) for e in g}
    total = sum(int(np.prod(e[3])) * out_dtype.itemsize for e in plan)
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg, dtype_name), f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(tmp)
  old = None
  if os.path.exists(path):
    old = tempfile.mkdtemp(prefix=".replaced-", dir=parent)
    os.replace(path, os.path.join(old, "model"))
  os.replace(tmp, path)
  if old:
    shutil.rmtree(old)
  return path


# ----------------------------------------------------------------------------------------------------
# PEFT adapter folders.

PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the base model's own names


def adapter_names(cfg: ModelConfig, adapter_path: str) -> str:
  """The PEFT tensor name template of one of our adapters ("layers.self_attn.q_proj.lora_a"): the kernel's HF name
  from the family's table with `.weight` -> `.lora_A.weight`, e.g.
  base_model.model.model.layers.{layer}.self_attn.q_proj.lora_A.weight."""
  module, which = adapter_path.rsplit(".", 1)
  kernel = FAMILIES[cfg.model_type].WEIGHT_NAMES[module + ".kernel"]
  return PEFT_PREFIX + kernel.removesuffix(".weight") + {"lora_a": ".lora_A.weight", "lora_b": ".lora_B.weight"}[which]


def save_adapter(model: Transformer, path: str, *, base_model: str, dtype: str | None = None) -> str:
  """Writes a LoRA model's adapters as a PEFT folder (adapter_config.json, adapter_model.safetensors) that
  `peft.PeftModel.from_pretrained(base, path)` loads onto the base model: lora_A.weight [rank, in] and
  lora_B.weight [out, rank] per layer (our A [in, rank] and B [rank, out], transposed). `base_model` goes into
  adapter_config.json's base_model_name_or_path. Written beside `path` and moved into place, like
  `save_pretrained`; on several processes every process must call it, only process 0 writes."""
  if model.lora is None:
    raise ValueError("save_adapter: the model has no LoRA adapters (student.lora.rank is 0)")
  flat = [(".".join(map(str, k)), v) for k, v in nnx.to_flat_state(nnx.state(model, lora_lib.ADAPTERS))]
  out_dtype = np.dtype(resolve_dtype(dtype)) if dtype else np.dtype(flat[0][1].get_value().dtype)
  specs, arrays = [], []
  for p, var in flat:  # adapters are small: all of them on the host at once
    value = _host_array(var.get_value()).astype(out_dtype)
    for idx, name in hf_entries(adapter_names(model.cfg, p), value.shape):
      specs.append((name, out_dtype, value[idx].T.shape))
      arrays.append(value[idx].T)
  lora = model.lora
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": lora.rank,
            "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": lora.modules(), "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
            "alpha_pattern": {}}
  if jax.process_index() != 0:
    return path
  parent = os.path.dirname(os.path.abspath(path)) or "."
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".adapter-", dir=parent)
  write_file(os.path.join(tmp, "adapter_model.safetensors"), specs, arrays)
  with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  if os.path.exists(path):
    shutil.rmtree(path)
  os.replace(tmp, path)
  return path
