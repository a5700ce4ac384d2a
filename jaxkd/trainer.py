"""The training loop: set up mesh, models, data and state; restore or start; run steps; evaluate; export.

The loop dispatches each step and only then reads the previous step's metrics, so the host never waits
on the device between steps. Checkpoints hold the student, optimizer state, step and data position;
rerunning the same command resumes from the latest finished one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxkd import checkpoint as ckpt_lib
from jaxkd import config_base, data, hidden, models, optim, reporting, step as step_lib, tiny
from jaxkd import sharding as shd

log = logging.getLogger("jaxkd")


def config_fingerprint(config) -> str:
  """Hash of the settings that define a run (not its length, logging or workdir)."""
  d = json.loads(config.to_json_best_effort())
  for key in ("workdir", "steps", "log_every", "checkpoint_every", "max_to_keep", "eval_every", "eval_batches",
              "overwrite", "export"):
    d.pop(key, None)
  return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class Run:
  """Everything a run sets up once; `train()` then runs the loop."""

  def __init__(self, config):
    config_base.validate(config)
    self.config = c = config
    self.workdir = os.path.abspath(c.workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self.mesh = shd.make_mesh({"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor})
    self.ckpt = ckpt_lib.Checkpointer(os.path.join(self.workdir, "checkpoints"), max_to_keep=c.max_to_keep)
    self.resume_step = self.ckpt.latest_step()

    # Models and tokenizers.
    self.student_path = models.hf_io.resolve_folder(tiny.resolve(c.student.path))
    self.tokenizer = data.load_tokenizer(tiny.resolve(c.student.tokenizer) if c.student.tokenizer
                                         else self.student_path)
    logit_kd = c.distill.alpha > 0 and c.distill.kind != "hidden"
    self.uses_teacher = logit_kd or c.distill.hidden.weight > 0
    self.teacher_tokenizer = None
    with jax.set_mesh(self.mesh):
      # On resume the student's weights come from the checkpoint: build it abstractly, read nothing.
      self.student = self._load(self.student_path, c.student.param_dtype, c.student.compute_dtype,
                                c.student.remat, abstract=self.resume_step is not None)
      self.teacher = None
      if self.uses_teacher:
        self.teacher_path = models.hf_io.resolve_folder(tiny.resolve(c.teacher.path))
        t_tok = data.load_tokenizer(tiny.resolve(c.teacher.tokenizer) if c.teacher.tokenizer
                                    else self.teacher_path)
        if not data.same_tokenizer(self.tokenizer, t_tok):
          if logit_kd:
            raise config_base.ConfigError(
                f"teacher tokenizer ({self.teacher_path}) differs from the student's ({self.student_path}) in "
                "vocabulary or merges: logit distillation compares the probabilities of the same token ids, so it "
                "needs a shared tokenizer. Distil hidden states instead: distill.kind=\"hidden\" and "
                "distill.hidden.weight=1.0 (aligned at positions where both tokenizers end a token)")
          self.teacher_tokenizer = t_tok
        self.teacher = self._load(self.teacher_path, c.teacher.dtype, c.teacher.dtype, "none", abstract=False)
    self._check_lengths_and_vocab()

    pairs = ()
    if c.distill.hidden.weight > 0:
      pairs = hidden.layer_map(self.student.cfg.num_layers, self.teacher.cfg.num_layers, c.distill.hidden.layer_map)
    self.loss_cfg = step_lib.LossConfig(
        alpha=float(c.distill.alpha), kind=c.distill.kind, temperature=float(c.distill.temperature),
        beta=float(c.distill.beta), skew=float(c.distill.skew), teacher_top_k=c.distill.teacher_top_k,
        vocab_size=self.vocab_size, fused=bool(c.distill.fused), chunk_size=int(c.distill.chunk_size),
        micro_batches=int(c.optimizer.micro_batches), hidden_weight=float(c.distill.hidden.weight),
        hidden_loss=c.distill.hidden.loss, hidden_layer_norm=bool(c.distill.hidden.layer_norm), layer_pairs=pairs,
        cross_tokenizer=self.teacher_tokenizer is not None)
    self.projector = None
    if pairs and self.student.cfg.hidden_size != self.teacher.cfg.hidden_size:
      with jax.set_mesh(self.mesh):
        make = lambda: hidden.Projector(len(pairs), self.student.cfg.hidden_size, self.teacher.cfg.hidden_size,
                                        rngs=nnx.Rngs(c.seed))
        self.projector = nnx.eval_shape(make) if self.resume_step is not None else make()

    # Data.
    kw = dict(tokenizer=self.tokenizer, seq_len=c.data.seq_len, batch_size=c.data.batch_size, seed=c.seed,
              teacher_tokenizer=self.teacher_tokenizer, cache_dir=os.path.join(self.workdir, "data_cache"))
    self.loader = data.make_loader(c.data, split="train", **kw)
    try:
      self.eval_loader = data.make_loader(c.data, split="eval", **kw)
      self.eval_start = self.eval_loader.get_state()
    except data.DataError as e:  # no held-out data configured: train without evaluation
      log.warning("no evaluation: %s", e)
      self.eval_loader = None

  def _load(self, path, dtype, compute_dtype, remat, *, abstract: bool):
    if not abstract:
      return models.from_pretrained(path, dtype=dtype, compute_dtype=compute_dtype, mesh=self.mesh, remat=remat)
    cfg = models.config_from_hf(models.read_config(path))
    pd, cd = models.hf_io.resolve_dtype(dtype), models.hf_io.resolve_dtype(compute_dtype)
    return nnx.eval_shape(lambda: models.Transformer(cfg, param_dtype=pd, dtype=cd, remat=remat,
                                                     rngs=nnx.Rngs(0)))

  def _check_lengths_and_vocab(self):
    c = self.config
    for name, model in (("student", self.student), ("teacher", self.teacher)):
      if model is not None and c.data.seq_len > model.cfg.max_position_embeddings:
        raise config_base.ConfigError(
            f"config.data.seq_len={c.data.seq_len} is longer than the {name}'s max_position_embeddings="
            f"{model.cfg.max_position_embeddings}; lower data.seq_len")
    dims = [self.student.cfg.vocab_size] + ([self.teacher.cfg.vocab_size] if self.teacher is not None else [])
    self.vocab_size = int(c.distill.vocab_size or len(self.tokenizer))
    if self.vocab_size > min(dims):
      raise config_base.ConfigError(
          f"config.distill.vocab_size={self.vocab_size} (default: the tokenizer's {len(self.tokenizer)} tokens) "
          f"exceeds a model's vocab dim {min(dims)}; the tokenizer does not belong to these models")

  # --------------------------------------------------------------------------------------------------

  def _initial_state(self, optimizer):
    s_def, s_state = nnx.split(self.student)
    self.student_def = s_def
    params = {"student": nnx.to_pure_dict(s_state)}
    param_sh = {"student": step_lib.module_shardings(self.mesh, self.student)}
    self.projector_def = None
    if self.projector is not None:
      self.projector_def, p_state = nnx.split(self.projector)
      params["projector"] = nnx.to_pure_dict(p_state)
      param_sh["projector"] = step_lib.module_shardings(self.mesh, self.projector)
    opt_abstract = jax.eval_shape(optimizer.init, params)
    opt_sh = step_lib.opt_state_shardings(self.mesh, opt_abstract, param_sh)
    replicated = NamedSharding(self.mesh, P())
    self.state_sh = step_lib.TrainState(step=replicated, params=param_sh, opt_state=opt_sh)
    if self.resume_step is not None:
      abstract = step_lib.TrainState(
          step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
          params=ckpt_lib.abstract_like(params, param_sh), opt_state=ckpt_lib.abstract_like(opt_abstract, opt_sh))
      state, data_state, _ = self.ckpt.restore(self.resume_step, abstract)
      self.loader.set_state(data_state)
      return state
    params = jax.device_put(params, param_sh)  # a no-op for the loaded student; places a new projector
    opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
    return step_lib.TrainState(step=jax.device_put(jnp.int32(0), replicated), params=params, opt_state=opt_state)

  def train(self) -> dict[str, Any]:
    c = self.config
    optimizer, lr_schedule = optim.make_optimizer(c.optimizer, c.steps)
    state = self._initial_state(optimizer)
    start = int(jax.device_get(state.step))
    t_def, t_params, t_sh = self._teacher()
    batch_sh = step_lib.batch_shardings(self.mesh, self.loss_cfg.batch_keys())
    train_step = step_lib.make_train_step(self.student_def, t_def, optimizer, lr_schedule, self.loss_cfg,
                                          projector_def=self.projector_def, state_shardings=self.state_sh,
                                          teacher_shardings=t_sh, batch_shardings=batch_sh)
    self.eval_step = step_lib.make_eval_step(self.student_def, t_def, self.loss_cfg,
                                             projector_def=self.projector_def, param_shardings=self.state_sh.params,
                                             teacher_shardings=t_sh, batch_shardings=batch_sh)
    self.t_params = t_params
    meta = {"fingerprint": config_fingerprint(c)}
    if start == 0:
      log.info("%s", self.loader.summary())
    else:
      log.info("resuming from step %d in %s", start, self.workdir)
    report = reporting.Reporter(self.workdir, total_steps=c.steps, start_step=start, log_every=c.log_every,
                                progress=c.progress)

    pending, last_time = None, time.time()
    with jax.set_mesh(self.mesh):
      for i in range(start, c.steps):
        batch = self._global_batch(self.loader)
        state, metrics = train_step(state, t_params, batch)
        if pending is not None:  # the previous step's numbers: reading them does not stall dispatch
          last_time = self._report(report, *pending, last_time)
        pending = (i + 1, metrics)
        if (i + 1) % c.checkpoint_every == 0 or i + 1 == c.steps:
          self.ckpt.save(state, self.loader.get_state(), meta, step=i + 1)
        if self.eval_loader and c.eval_every and (i + 1) % c.eval_every == 0 and i + 1 != c.steps:
          report.eval(i + 1, self.evaluate(state.params))
      if pending is not None:
        self._report(report, *pending, last_time)
      final_eval = self.evaluate(state.params)
      if final_eval is not None:
        report.eval(c.steps, final_eval)
    report.close()
    self.ckpt.wait()
    self.final_params = state.params
    summary = {"step": c.steps, "eval": final_eval, "workdir": self.workdir}
    if c.export.enabled:
      summary["export"] = self.export(state.params)
    ckpt_lib.write_json(os.path.join(self.workdir, "summary.json"), summary)
    self.ckpt.close()
    return summary

  def _global_batch(self, loader) -> dict:
    local = next(loader)
    return data.global_batch({k: local[k] for k in self.loss_cfg.batch_keys()}, self.mesh)

  def _teacher(self):
    """(graphdef, parameters, shardings) of the teacher, or Nones without one."""
    if self.teacher is None:
      return None, None, None
    t_def, t_state = nnx.split(self.teacher)
    return t_def, nnx.to_pure_dict(t_state), step_lib.module_shardings(self.mesh, self.teacher)

  def evaluate_loaded(self) -> dict[str, float] | None:
    """Held-out metrics of the student as loaded, before any training (a baseline, or a teacher's score)."""
    self.student_def, s_state = nnx.split(self.student)
    t_def, self.t_params, _ = self._teacher()
    self.eval_step = step_lib.make_eval_step(self.student_def, t_def, self.loss_cfg)
    with jax.set_mesh(self.mesh):
      return self.evaluate({"student": nnx.to_pure_dict(s_state)})

  @staticmethod
  def _report(report, step: int, metrics, last_time: float) -> float:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.time()
    values["tokens_per_s"] = values["tokens"] / max(now - last_time, 1e-9)
    report.step(step, values)
    return now

  def evaluate(self, params) -> dict[str, float] | None:
    """Held-out metrics over the eval split (the same batches every time); None without eval data."""
    if self.eval_loader is None:
      return None
    self.eval_loader.set_state(self.eval_start)
    out = step_lib.evaluate(self.eval_step, params, self.t_params, self._batches(self.eval_loader), self.loss_cfg)
    if out is None:
      raise data.DataError("the eval split is empty: raise data.eval_fraction or check data.eval_split")
    return out

  def _batches(self, loader):
    while True:
      try:
        yield self._global_batch(loader)
      except StopIteration:
        return

  def export(self, params) -> str:
    student = nnx.merge(self.student_def, params["student"])  # the projector is never exported
    path = os.path.join(self.workdir, "export")
    models.save_pretrained(student, path, tokenizer=self.tokenizer, dtype=self.config.export.dtype)
    return path


def run(config) -> dict[str, Any]:
  return Run(config).train()
