"""What a run sets up before its first step, as functions usable alone, and the program it compiles.

  make_mesh(c)                 the device mesh, checked against the batch
  load_tokenizers(c)           the student's tokenizer, and the teacher's where it differs
  load_models(c, mesh, ...)    both models, loaded, or as abstract shapes from config.json alone
  check_fit(c, ...)            lengths and vocabulary against both models; the vocabulary size compared
  loss_settings(c, ...)        step.LossConfig with the layer pairs and tokenizer facts
  make_projector(c, ...)       the hidden-state projection, where the widths differ
  build(c, mesh, ...)          optimizer, shardings, the jitted train and eval steps, their abstract inputs

`abstract_program(c, devices)` does all of it from config.json and tokenizer files only (no weight is read, no
device memory is used), on any devices: so the exact train step of a run can be compiled for a TPU topology
from a CPU, `prog.train_step.lower(*prog.abstract_inputs()).compile()`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkd import checkpoint as ckpt_lib
from jaxkd import config_base, data, generate, hidden, models, on_policy, optim, signals, step as step_lib, tiny
from jaxkd import sharding as shd
from jaxkd.models import lora as lora_lib
from jaxkd.models import presets
from jaxkd.models import quantize as quantize_lib


def make_mesh(c, devices=None):
  """The (data, fsdp, tensor) mesh of `c.mesh` over `devices` (default: all), refusing a batch it cannot split."""
  mesh = shd.make_mesh(c.mesh.to_dict(), devices)
  problem = shd.batch_problem(mesh, c.data.batch_size, "config.data.batch_size",
                              "set mesh.fsdp / mesh.data (and mesh.tensor) to split it fewer ways")
  if problem:
    raise config_base.ConfigError(problem)
  return mesh


def model_folder(side) -> str:
  """The local folder of `config.student` or `config.teacher` (tiny:NAME built on first use)."""
  return models.hf_io.resolve_folder(tiny.resolve(side.path))


@dataclasses.dataclass
class Tokenizers:
  student: Any
  teacher: Any | None  # only where it differs from the student's: the teacher then reads its own tokens


@dataclasses.dataclass(frozen=True)
class PresetTokenizer:
  """Stands in for the tokenizer of a preset hub id that is not on this machine (ahead-of-time compiles only):
  its size is taken as the model's vocabulary rows, and two presets share one when their families do."""

  model_type: str
  rows: int

  def __len__(self) -> int:
    return self.rows


def _tokenizer(side, *, presets_ok: bool):
  preset = _preset(side) if presets_ok and not side.tokenizer else None
  if preset is not None:
    return PresetTokenizer(preset["model_type"], preset["vocab_size"])
  return data.load_tokenizer(tiny.resolve(side.tokenizer) if side.tokenizer else model_folder(side))


def _same(a, b) -> bool:
  if isinstance(a, PresetTokenizer) or isinstance(b, PresetTokenizer):
    return type(a) is type(b) and a.model_type == b.model_type
  return data.same_tokenizer(a, b)


def load_tokenizers(c, lc: step_lib.LossConfig, *, presets_ok: bool = False) -> Tokenizers:
  """The tokenizers of run config `c`; the one place that decides whether the teacher's differs. With
  `presets_ok` (ahead-of-time compiles), a preset hub id that is not here gets a `PresetTokenizer`."""
  tok = _tokenizer(c.student, presets_ok=presets_ok)
  if not lc.uses_teacher or lc.cached:  # a cache's tokens are checked against the student's, row by row
    return Tokenizers(tok, None)
  t_tok = _tokenizer(c.teacher, presets_ok=presets_ok)
  if _same(tok, t_tok):
    return Tokenizers(tok, None)
  if lc.logit_kd:
    raise config_base.ConfigError(
        f"teacher tokenizer ({c.teacher.tokenizer or c.teacher.path}) differs from the student's "
        f"({c.student.tokenizer or c.student.path}) in "
        "vocabulary or merges: logit distillation compares the probabilities of the same token ids, so it needs a "
        "shared tokenizer. Distil hidden states instead: distill.kind=\"hidden\" and distill.hidden.weight=1.0 "
        "(aligned at positions where both tokenizers end a token)")
  return Tokenizers(tok, t_tok)


def _preset(side) -> dict | None:
  """config.json of a hub id jaxkd knows (jaxkd.models.presets) that is not on this machine; None otherwise."""
  if tiny.resolve(side.path) != side.path or os.path.isdir(side.path) or side.path not in presets.PRESETS:
    return None
  try:
    model_folder(side)
    return None
  except FileNotFoundError:
    return presets.PRESETS[side.path]


def load_model(side, *, dtype: str, compute_dtype: str, remat: str, attention: str, mesh, abstract: bool,
               lora: lora_lib.LoraConfig | None = None, seed: int = 0, quantize: str = ""):
  """One model of the run: read and placed on `mesh`, or (abstract) its shapes from config.json alone (from
  jaxkd.models.presets for a known hub id that is not on this machine); with `lora`, adapters beside its
  weights (initialised from `seed`); `quantize`: see jaxkd.models.quantize."""
  preset = _preset(side) if abstract else None
  if preset is None:
    folder = model_folder(side)
    if not abstract:
      return models.from_pretrained(folder, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh, remat=remat,
                                    attention=attention, lora=lora, seed=seed, quantize=quantize)
  cfg = models.config_from_hf(preset if preset is not None else models.read_config(model_folder(side)))
  pd, cd = models.hf_io.resolve_dtype(dtype), models.hf_io.resolve_dtype(compute_dtype)
  model = nnx.eval_shape(lambda: models.Transformer(cfg, param_dtype=pd, dtype=cd, remat=remat, attention=attention,
                                                    lora=lora, rngs=nnx.Rngs(seed)))
  return quantize_lib.quantize(model, quantize)


def load_teacher(c, mesh, *, abstract: bool):
  """The teacher model of run config `c` (train, capture and their ahead-of-time compiles load it alike)."""
  return load_model(c.teacher, dtype=c.teacher.dtype, compute_dtype=c.teacher.dtype, remat="none",
                    attention=c.teacher.attention, mesh=mesh, abstract=abstract, quantize=c.teacher.quantize)


def load_models(c, mesh, lc: step_lib.LossConfig, *, abstract_student: bool, abstract_teacher: bool = False):
  """(student, teacher or None). On resume the student's weights come from the checkpoint: abstract (but a LoRA
  student's checkpoint holds its adapters alone: its base weights are read all the same)."""
  lora = lora_lib.settings(c.student.lora)
  with jax.set_mesh(mesh):
    student = load_model(c.student, dtype=c.student.param_dtype, compute_dtype=c.student.compute_dtype,
                         remat=c.student.remat, attention=c.student.attention, mesh=mesh, abstract=abstract_student,
                         lora=lora, seed=c.seed)
    teacher = None
    if lc.uses_teacher and not lc.cached:
      teacher = load_teacher(c, mesh, abstract=abstract_teacher)
  return student, teacher


def check_fit(c, student_cfg, teacher_cfg, toks: Tokenizers) -> int:
  """Refuses rows longer than a model's positions and a vocabulary past a model's rows; the vocabulary size
  the loss compares (distill.vocab_size, default the tokenizer's: padded embedding rows are cut)."""
  cross = toks.teacher is not None  # the teacher reads rows of its own tokens
  s_len = ("data.seq_len", c.data.seq_len)
  t_len = ("data.teacher_seq_len", c.data.teacher_seq_len) if cross and c.data.teacher_seq_len else s_len
  for name, cfg, (key, length) in (("student", student_cfg, s_len), ("teacher", teacher_cfg, t_len)):
    problem = cfg and cfg.too_long(length, what=f"config.{key}={length}", name=name, fix=f"lower {key}")
    if problem:
      raise config_base.ConfigError(problem)
  dims = [student_cfg.vocab_size] + ([teacher_cfg.vocab_size] if teacher_cfg is not None and not cross else [])
  vocab_size = int(c.distill.vocab_size or len(toks.student))
  if vocab_size > min(dims):
    raise config_base.ConfigError(
        f"config.distill.vocab_size={vocab_size} (default: the tokenizer's {len(toks.student)} tokens) exceeds a "
        f"model's vocab dim {min(dims)}; the tokenizer does not belong to these models")
  if cross and len(toks.teacher) > teacher_cfg.vocab_size:
    raise config_base.ConfigError(
        f"the teacher's tokenizer has {len(toks.teacher)} tokens but the teacher's vocab dim is "
        f"{teacher_cfg.vocab_size}; config.teacher.tokenizer does not belong to config.teacher.path")
  return vocab_size


def loss_settings(c, student_cfg, teacher_cfg, toks: Tokenizers) -> step_lib.LossConfig:
  """The run's LossConfig with what the models and tokenizers decide: vocabulary, layer pairs, cross-tokenizer."""
  vocab_size = check_fit(c, student_cfg, teacher_cfg, toks)
  pairs = ()
  if c.distill.hidden.weight > 0:
    pairs = hidden.layer_map(student_cfg.num_layers, teacher_cfg.num_layers, c.distill.hidden.layer_map)
  return step_lib.loss_config(c, vocab_size=vocab_size, layer_pairs=pairs, cross_tokenizer=toks.teacher is not None)


def make_projector(c, lc: step_lib.LossConfig, student_cfg, teacher_cfg, mesh, *, abstract: bool):
  """The learned projection of student hidden states to the teacher's width; None where the widths agree."""
  if not lc.layer_pairs or student_cfg.hidden_size == teacher_cfg.hidden_size:
    return None
  make = lambda: hidden.Projector(len(lc.layer_pairs), student_cfg.hidden_size, teacher_cfg.hidden_size,
                                  rngs=nnx.Rngs(c.seed))
  with jax.set_mesh(mesh):
    return nnx.eval_shape(make) if abstract else make()


@dataclasses.dataclass
class Program:
  """Everything a run compiles, with the shardings and the (concrete or abstract) values it starts from."""

  config: Any
  mesh: Any
  lc: step_lib.LossConfig
  student_cfg: Any  # models.ModelConfig
  teacher_cfg: Any  # None without a teacher
  optimizer: Any
  lr_schedule: Any
  student_def: Any
  projector_def: Any
  teacher: signals.TeacherSource | None
  eval_lc: step_lib.LossConfig  # lc, but for held-out data: from a teacher cache, the student's CE alone
  params: dict  # {"student", "projector"?}: arrays, or ShapeDtypeStructs of abstract models
  teacher_params: Any
  state_shardings: step_lib.TrainState
  teacher_shardings: Any
  batch_shardings: dict
  train_step: Any  # jitted (state, frozen, batch) -> (state, metrics)
  eval_step: Any  # jitted (params, frozen, batch) -> aux sums
  rollout: on_policy.Rollout | None = None  # on-policy steps' sampling settings; None: off
  on_policy_step: Any = None  # jitted like train_step: samples completions of the batch's prompts, trains on them
  # A LoRA student's frozen base weights (params["student"] holds its adapters) and their shardings; None: off.
  student_base: Any = None
  student_base_shardings: Any = None

  @property
  def frozen(self):
    """The steps' second input, which they read and never change: the teacher's parameters, and a LoRA student's
    base weights (step.frozen_input)."""
    return step_lib.frozen_input(self.teacher_params, self.student_base)

  @property
  def frozen_shardings(self):
    return step_lib.frozen_input(self.teacher_shardings, self.student_base_shardings)

  def student(self, params):
    """The student module of `params` (a TrainState's, or the loaded ones), with a LoRA student's base weights."""
    if self.student_base is None:
      return nnx.merge(self.student_def, params["student"])
    return nnx.merge(self.student_def, self.student_base, params["student"])

  def abstract_state(self) -> step_lib.TrainState:
    sh = self.state_shardings
    opt = jax.eval_shape(self.optimizer.init, self.params)
    rng = jax.eval_shape(lambda: on_policy.initial_key(0)) if self.rollout is not None else None
    return step_lib.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=sh.step),
                               params=ckpt_lib.abstract_like(self.params, sh.params),
                               opt_state=ckpt_lib.abstract_like(opt, sh.opt_state),
                               rng=ckpt_lib.abstract_like(rng, sh.rng) if rng is not None else None)

  def initial_rng(self):
    """The sampling key a fresh run starts from (TrainState.rng), placed; None without on-policy steps."""
    if self.rollout is None:
      return None
    return jax.device_put(on_policy.initial_key(self.config.seed), self.state_shardings.rng)

  def abstract_batch(self) -> dict:
    """The global batch the loader hands the step, as ShapeDtypeStructs (see jaxkd.data.loader)."""
    d = self.config.data
    rows, t = d.batch_size, d.seq_len
    lengths = {"teacher": d.teacher_seq_len or t, "align": d.max_align or t}
    shapes = {k: ((rows, t), np.int32) for k in step_lib.STUDENT_KEYS}
    shapes["loss_mask"] = ((rows, t), np.float32)
    shapes.update({k: ((rows, lengths["teacher"]), np.int32)
                   for k in ("teacher_input_ids", "teacher_segment_ids", "teacher_positions")})
    a = lengths["align"]
    shapes.update(align_student=((rows, a), np.int32), align_teacher=((rows, a), np.int32),
                  align_mask=((rows, a), np.float32))
    if self.lc.cached:  # k as captured (as capture.top_k says for a cache still to be made)
      k = cache_k(self.config)
      shapes.update(teacher_indices=((rows, t, k), np.int32), teacher_logprobs=((rows, t, k), np.float32))
    return {k: jax.ShapeDtypeStruct(*shapes[k], sharding=s) for k, s in self.batch_shardings.items()}

  def abstract_inputs(self) -> tuple:
    """(state, frozen inputs, batch) as ShapeDtypeStructs on their shardings: `train_step.lower(*...)`."""
    frozen = self.frozen
    frozen = ckpt_lib.abstract_like(frozen, self.frozen_shardings) if frozen is not None else None
    return self.abstract_state(), frozen, self.abstract_batch()


def rollout_settings(c, lc: step_lib.LossConfig, toks: Tokenizers) -> on_policy.Rollout | None:
  """The on-policy sampling settings of `c` (None where off): a completion ends at the student tokenizer's
  end-of-turn ids (none known for a `PresetTokenizer`: ahead-of-time compiles, where only shapes matter)."""
  eos = () if isinstance(toks.student, PresetTokenizer) else generate.eos_ids_of(toks.student)
  return on_policy.settings(c, eos_ids=eos, vocab_size=lc.vocab_size)


def build(c, mesh, student, teacher, projector, lc: step_lib.LossConfig,
          rollout: on_policy.Rollout | None = None) -> Program:
  """The optimizer, shardings and jitted steps of a run over these (concrete or abstract) modules."""
  optimizer, lr_schedule = optim.make_optimizer(c.optimizer, c.steps)
  student_def, s_state = nnx.split(student)
  params = {"student": nnx.to_pure_dict(s_state)}
  param_sh = {"student": shd.module_shardings(mesh, student)}
  student_base = base_sh = lora_seed = None
  if student.lora is not None:  # the adapters are trained; the base weights are a frozen input of the steps
    params["student"] = nnx.to_pure_dict(nnx.state(student, lora_lib.ADAPTERS))
    param_sh["student"] = shd.module_shardings(mesh, student, lora_lib.ADAPTERS)
    student_base = nnx.to_pure_dict(nnx.state(student, lora_lib.BASE))
    base_sh = shd.module_shardings(mesh, student, lora_lib.BASE)
    lora_seed = int(c.seed)
  projector_def = None
  if projector is not None:
    projector_def, p_state = nnx.split(projector)
    params["projector"] = nnx.to_pure_dict(p_state)
    param_sh["projector"] = shd.module_shardings(mesh, projector)
  opt_sh = shd.opt_state_shardings(mesh, jax.eval_shape(optimizer.init, params), param_sh)
  state_sh = step_lib.TrainState(step=shd.replicated(mesh), params=param_sh, opt_state=opt_sh,
                                 rng=shd.replicated(mesh) if rollout is not None else None)
  teacher_def = teacher_params = teacher_sh = None
  if teacher is not None:
    teacher_def, t_state = nnx.split(teacher)
    teacher_params, teacher_sh = nnx.to_pure_dict(t_state), shd.module_shardings(mesh, teacher)
  source = signals.CachedTeacher() if lc.cached else signals.online(teacher_def)
  eval_lc = dataclasses.replace(lc, alpha=0.0, cached=False) if lc.cached else lc
  batch_sh = shd.batch_shardings(mesh, lc.batch_keys())
  frozen_sh = step_lib.frozen_input(teacher_sh, base_sh)
  train_step = step_lib.make_train_step(student_def, source, optimizer, lr_schedule, lc, projector_def=projector_def,
                                        state_shardings=state_sh, teacher_shardings=frozen_sh,
                                        batch_shardings=batch_sh, lora_seed=lora_seed)
  on_policy_step = None
  if rollout is not None:
    on_policy_step = step_lib.make_on_policy_step(
        student_def, source, optimizer, lr_schedule, lc, rollout, projector_def=projector_def,
        state_shardings=state_sh, teacher_shardings=frozen_sh, batch_shardings=batch_sh, lora_seed=lora_seed)
  eval_step = step_lib.make_eval_step(student_def, source, eval_lc, projector_def=projector_def,
                                      param_shardings=param_sh, teacher_shardings=frozen_sh,
                                      batch_shardings=shd.batch_shardings(mesh, eval_lc.batch_keys()),
                                      lora_seed=lora_seed)
  return Program(config=c, mesh=mesh, lc=lc, student_cfg=student.cfg,
                 teacher_cfg=teacher.cfg if teacher is not None else None, optimizer=optimizer,
                 lr_schedule=lr_schedule, student_def=student_def, projector_def=projector_def, teacher=source,
                 eval_lc=eval_lc,
                 params=params, teacher_params=teacher_params,
                 state_shardings=state_sh, teacher_shardings=teacher_sh, batch_shardings=batch_sh,
                 train_step=train_step, eval_step=eval_step, rollout=rollout, on_policy_step=on_policy_step,
                 student_base=student_base, student_base_shardings=base_sh)


def cache_k(c) -> int:
  """The k of the run's teacher cache (capture.top_k where the cache is not made yet)."""
  from jaxkd import teacher_cache  # pylint: disable=import-outside-toplevel
  from jaxkd.teacher_cache import store  # pylint: disable=import-outside-toplevel

  if os.path.isfile(os.path.join(c.teacher.cache, "manifest.json")):  # the manifest says; no shard is read
    return int(store.read_manifest(c.teacher.cache)["k"])
  if teacher_cache.is_capture(c.teacher.cache):
    return int(teacher_cache.DistillKitCapture(c.teacher.cache).k)
  return int(c.capture.top_k)


def abstract_program(c, devices=None) -> Program:
  """The whole program of run config `c` from config.json and tokenizer files alone (no weight read): on
  `devices` (default: this host's), which may be compile-only devices of a TPU topology."""
  config_base.validate(c)
  mesh = make_mesh(c, devices)
  lc = step_lib.loss_config(c)
  toks = load_tokenizers(c, lc, presets_ok=True)
  student, teacher = load_models(c, mesh, lc, abstract_student=True, abstract_teacher=True)
  lc = loss_settings(c, student.cfg, teacher.cfg if teacher is not None else None, toks)
  projector = make_projector(c, lc, student.cfg, teacher.cfg if teacher is not None else None, mesh, abstract=True)
  return build(c, mesh, student, teacher, projector, lc, rollout_settings(c, lc, toks))
