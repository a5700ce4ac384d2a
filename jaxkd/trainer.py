"""The training loop: set up mesh, models, data and state; restore or start; run steps; evaluate; export.

The loop dispatches each step and only then reads the previous step's metrics, so the host never waits
on the device between steps. Checkpoints hold the student, optimizer state, step and data position;
rerunning the same command resumes from the newest finished one, and the resumed run computes bitwise
what the uninterrupted run would have (on the same devices).

What a run survives:
  * kill -9 at any moment, mid-save included: the unfinished save is ignored (see jaxkd.checkpoint) and
    metrics.jsonl lines past the restored step are dropped and logged again.
  * SIGTERM (preemption): the run saves the next step it reaches and raises `Preempted`
    (`python -m jaxkd.train` exits with status 75). With several processes JAX's preemption
    sync point picks the step, the same on every process.
  * NaN or Inf in the loss or the gradients: the step leaves the parameters and optimizer state as they
    were; `nonfinite="skip"` counts it (metric `skipped_nonfinite`) and goes on, `"stop"` ends the run
    with NonFiniteError. No checkpoint ever holds NaN or Inf.
  * A workdir that holds a run of another config: refused, naming the keys that differ, unless
    `overwrite=True`, which moves the old run to `<workdir>.replaced-<time>` (nothing is deleted).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkd import checkpoint as ckpt_lib
from jaxkd import config_base, data, distributed, hidden, models, optim, reporting, signals, step as step_lib, tiny
from jaxkd import samples as samples_lib
from jaxkd import workdir as workdir_lib
from jaxkd import sharding as shd

log = logging.getLogger("jaxkd")

NonFiniteError = ckpt_lib.NonFiniteError
# Errors whose message says all there is to say (what is wrong, how to fix it): no traceback needed.
EXPECTED_ERRORS = (config_base.ConfigError, ckpt_lib.CheckpointError, NonFiniteError, data.DataError,
                   models.WeightsError, models.UnsupportedConfigError, FileNotFoundError)

class Preempted(Exception):
  """A SIGTERM stopped the run after saving `step`; rerunning the same command resumes from there."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"preempted: saved checkpoint step {step} in {directory}; rerun the same command to resume")
    self.step = step


class Run:
  """Everything a run sets up once; `train()` then runs the loop."""

  def __init__(self, config):
    config_base.validate(config)
    self.config = c = config
    distributed.initialize(c.distributed)  # before anything touches a device
    self.workdir = os.path.abspath(c.workdir)
    if distributed.is_main():
      os.makedirs(self.workdir, exist_ok=True)
    distributed.barrier("jaxkd:workdir")
    self.mesh = shd.make_mesh(c.mesh.to_dict())
    problem = shd.batch_problem(self.mesh, c.data.batch_size, "config.data.batch_size",
                                "set mesh.fsdp / mesh.data (and mesh.tensor) to split it fewer ways")
    if problem:
      raise config_base.ConfigError(problem)
    self.ckpt = workdir_lib.claim(self.workdir, c, self._checkpointer(), self._checkpointer)
    # With checkpoints present the run resumes (or fails loudly): it never starts afresh over them.
    self.resume_step = self.ckpt.latest_step()
    if self.resume_step is not None and self.resume_step > c.steps:
      raise config_base.ConfigError(
          f"config.steps={c.steps}, but {self.workdir} holds a checkpoint of step {self.resume_step}, past it: set "
          f"steps >= {self.resume_step} to resume (or finish) that run, or use another workdir")
    self.skipped = 0  # steps whose update was skipped for NaN/Inf (restored from the checkpoint)

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
                                c.student.remat, c.student.attention, abstract=self.resume_step is not None)
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
        self.teacher = self._load(self.teacher_path, c.teacher.dtype, c.teacher.dtype, "none", c.teacher.attention,
                                  abstract=False)
    self._check_lengths_and_vocab()
    if c.debug.start_delay_s:
      log.info("start-up held for %s s (debug.start_delay_s)", c.debug.start_delay_s)
      time.sleep(c.debug.start_delay_s)

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
    self.data_processes = int(c.debug.data_processes) or jax.process_count()
    if c.debug.data_processes:
      if jax.process_count() != 1:
        raise config_base.ConfigError(
            f"config.debug.data_processes={c.debug.data_processes}: only for a single process (it imitates "
            f"several); this run already has {jax.process_count()}")
      make = lambda split: data.ImitatedProcesses(
          lambda i, k: data.make_loader(c.data, split=split, process_index=i, process_count=k, **kw),
          self.data_processes)
    else:
      make = lambda split: data.make_loader(c.data, split=split, **kw)
    self.loader = make("train")
    try:
      self.eval_loader = make("eval")
      self.eval_start = self.eval_loader.get_state()
    except data.DataError as e:  # no held-out data configured: train without evaluation
      log.warning("no evaluation: %s", e)
      self.eval_loader = None

  def _checkpointer(self) -> ckpt_lib.Checkpointer:
    c = self.config
    return ckpt_lib.Checkpointer(os.path.join(self.workdir, "checkpoints"), max_to_keep=c.max_to_keep,
                                 save_delay_s=float(c.debug.save_delay_s))

  def _load(self, path, dtype, compute_dtype, remat, attention, *, abstract: bool):
    if not abstract:
      return models.from_pretrained(path, dtype=dtype, compute_dtype=compute_dtype, mesh=self.mesh, remat=remat,
                                    attention=attention)
    cfg = models.config_from_hf(models.read_config(path))
    pd, cd = models.hf_io.resolve_dtype(dtype), models.hf_io.resolve_dtype(compute_dtype)
    return nnx.eval_shape(lambda: models.Transformer(cfg, param_dtype=pd, dtype=cd, remat=remat, attention=attention,
                                                     rngs=nnx.Rngs(0)))

  def _check_lengths_and_vocab(self):
    c = self.config
    cross = self.teacher_tokenizer is not None  # the teacher reads rows of its own tokens
    s_len = ("data.seq_len", c.data.seq_len)
    t_len = ("data.teacher_seq_len", c.data.teacher_seq_len) if cross and c.data.teacher_seq_len else s_len
    for name, model, (key, length) in (("student", self.student, s_len), ("teacher", self.teacher, t_len)):
      if model is not None and length > model.cfg.max_position_embeddings:
        raise config_base.ConfigError(
            f"config.{key}={length} is longer than the {name}'s max_position_embeddings="
            f"{model.cfg.max_position_embeddings}; lower {key}")
    shares_vocab = self.teacher is not None and not cross
    dims = [self.student.cfg.vocab_size] + ([self.teacher.cfg.vocab_size] if shares_vocab else [])
    self.vocab_size = int(c.distill.vocab_size or len(self.tokenizer))
    if self.vocab_size > min(dims):
      raise config_base.ConfigError(
          f"config.distill.vocab_size={self.vocab_size} (default: the tokenizer's {len(self.tokenizer)} tokens) "
          f"exceeds a model's vocab dim {min(dims)}; the tokenizer does not belong to these models")
    if cross and len(self.teacher_tokenizer) > self.teacher.cfg.vocab_size:
      raise config_base.ConfigError(
          f"the teacher's tokenizer has {len(self.teacher_tokenizer)} tokens but the teacher's vocab dim is "
          f"{self.teacher.cfg.vocab_size}; config.teacher.tokenizer does not belong to config.teacher.path")

  # --------------------------------------------------------------------------------------------------

  def _initial_state(self, optimizer):
    s_def, s_state = nnx.split(self.student)
    self.student_def = s_def
    params = {"student": nnx.to_pure_dict(s_state)}
    param_sh = {"student": shd.module_shardings(self.mesh, self.student)}
    self.projector_def = None
    if self.projector is not None:
      self.projector_def, p_state = nnx.split(self.projector)
      params["projector"] = nnx.to_pure_dict(p_state)
      param_sh["projector"] = shd.module_shardings(self.mesh, self.projector)
    opt_abstract = jax.eval_shape(optimizer.init, params)
    opt_sh = shd.opt_state_shardings(self.mesh, opt_abstract, param_sh)
    replicated = shd.replicated(self.mesh)
    self.state_sh = step_lib.TrainState(step=replicated, params=param_sh, opt_state=opt_sh)
    if self.resume_step is not None:
      abstract = step_lib.TrainState(
          step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
          params=ckpt_lib.abstract_like(params, param_sh), opt_state=ckpt_lib.abstract_like(opt_abstract, opt_sh))
      restored = self.ckpt.restore_latest(abstract)
      if restored is None:
        raise ckpt_lib.CheckpointError(f"the checkpoints in {self.ckpt.directory} disappeared while starting; "
                                       "rerun to resume from what is there")
      self.resume_step, state, data_states, meta = restored
      self._set_data_states(data_states)
      self.skipped = int(meta.get("skipped_nonfinite", 0))
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
    batch_sh = shd.batch_shardings(self.mesh, self.loss_cfg.batch_keys())
    train_step = step_lib.make_train_step(self.student_def, signals.online(t_def), optimizer, lr_schedule, self.loss_cfg,
                                          projector_def=self.projector_def, state_shardings=self.state_sh,
                                          teacher_shardings=t_sh, batch_shardings=batch_sh)
    self.eval_step = step_lib.make_eval_step(self.student_def, signals.online(t_def), self.loss_cfg,
                                             projector_def=self.projector_def, param_shardings=self.state_sh.params,
                                             teacher_shardings=t_sh, batch_shardings=batch_sh)
    self.t_params = t_params
    self.meta = {"config": workdir_lib.config_dict(c), "data_processes": self.data_processes}
    if distributed.is_main():  # what the workdir holds, for the next start to compare with (_claim_workdir)
      ckpt_lib.write_json(os.path.join(self.workdir, "config.json"), workdir_lib.config_dict(c))
    if start == 0:
      log.info("%s", self.loader.summary())
    else:
      log.info("resuming from step %d in %s", start, self.workdir)
    metrics_path = os.path.join(self.workdir, "metrics.jsonl")
    # The checkpoint at `start` is saved before that step's evaluation: a run stopped between the two (a
    # preemption notice at an eval step, a kill) would lose it, so a resume there evaluates again.
    eval_at_start = bool(self.eval_loader and c.eval_every and 0 < start < c.steps and start % c.eval_every == 0)
    if (start == c.steps or eval_at_start) and distributed.is_main():  # (a finished run's: done again below)
      reporting.truncate_after(metrics_path, start, evals_at_step=False)
    report = reporting.Reporter(self.workdir, total_steps=c.steps, start_step=start, log_every=c.log_every,
                                progress=c.progress)
    watch = distributed.PreemptionWatch()
    try:
      with jax.set_mesh(self.mesh):
        if eval_at_start:
          report.eval(start, self.evaluate(state.params))
        state = self._loop(state, train_step, t_params, start, report, watch)
        if watch.signalled:  # after the last step nothing is left to save: finish within the grace period
          log.warning("SIGTERM after the last step: finishing the evaluation and export")
        final_eval = self.evaluate(state.params)
        if final_eval is not None:
          report.eval(c.steps, final_eval)
      report.close()
      self.ckpt.wait()
      self.final_params = state.params
      summary = {"step": c.steps, "eval": final_eval, "workdir": self.workdir}
      if c.export.enabled:
        summary["export"] = self.export(state.params)
      if c.samples.count:
        summary["samples"] = self.samples(state.params, t_def, t_params)
      if distributed.is_main():
        ckpt_lib.write_json(os.path.join(self.workdir, "summary.json"), summary)
      self.ckpt.close()
      return summary
    except BaseException:
      self._finish_saving_quietly()  # a save already under way is finished, not lost with the run
      raise
    finally:
      watch.close()

  def _loop(self, state, train_step, t_params, start: int, report, watch):
    c = self.config
    pending, self._last_time = None, time.time()
    for i in range(start, c.steps):
      step = i + 1
      self.ckpt.raise_if_failed()  # a failed background save stops the run now, not at the next save
      batch = self._global_batch(self.loader, poison=step == c.debug.poison_step)
      state, metrics = train_step(state, t_params, batch)
      if pending is not None:  # the previous step's numbers: reading them does not stall dispatch
        self._report(report, *pending)
      pending = (step, metrics)
      if c.debug.step_delay_s:
        time.sleep(c.debug.step_delay_s)
      preempted = watch.reached(step)
      if preempted or step % c.checkpoint_every == 0 or step == c.steps:
        # This step's numbers first: under nonfinite="stop" a NaN step must end the run before it is saved,
        # and the count of skipped steps in the checkpoint must include it.
        self._report(report, *pending)
        pending = None
        self._save(state, step)
      if preempted:
        log.warning("preemption notice (SIGTERM): saved step %d, stopping", step)
        report.close()
        self.ckpt.wait()
        raise Preempted(step, self.ckpt.directory)
      if self.eval_loader and c.eval_every and step % c.eval_every == 0 and step != c.steps:
        report.eval(step, self.evaluate(state.params))
    if pending is not None:
      self._report(report, *pending)
    return state

  def _save(self, state, step: int) -> None:
    meta = {**self.meta, "skipped_nonfinite": self.skipped}
    self.ckpt.save(state, self._data_states(), meta, step=step)

  def _finish_saving_quietly(self) -> None:
    try:
      self.ckpt.wait()
    except Exception as e:  # noqa: BLE001  (the run is already failing with the error that matters)
      log.error("%s", e)

  def _data_states(self) -> list:
    """The data position of every process (or imitated process), in process order."""
    if isinstance(self.loader, data.ImitatedProcesses):
      return self.loader.get_state()
    return distributed.gather_json(self.loader.get_state())

  def _set_data_states(self, states: list) -> None:
    if len(states) != self.data_processes:
      raise data.DataError(
          f"the checkpoint's data position was saved by {len(states)} process(es) but this run reads the data as "
          f"{self.data_processes}; each process reads its own share of the rows, so resume with "
          f"distributed.num_processes={len(states)}")
    if isinstance(self.loader, data.ImitatedProcesses):
      self.loader.set_state(states)
    else:
      self.loader.set_state(states[jax.process_index()])

  def _global_batch(self, loader, *, poison: bool = False) -> dict:
    local = next(loader)
    local = {k: local[k] for k in self.loss_cfg.batch_keys()}
    if poison:  # debug.poison_step: a target id past the vocabulary makes the cross entropy NaN (test hook)
      local["targets"] = np.full_like(local["targets"], np.iinfo(np.int32).max)
    return data.global_batch(local, self.mesh)

  def _teacher(self):
    """(graphdef, parameters, shardings) of the teacher, or Nones without one."""
    if self.teacher is None:
      return None, None, None
    t_def, t_state = nnx.split(self.teacher)
    return t_def, nnx.to_pure_dict(t_state), shd.module_shardings(self.mesh, self.teacher)

  def evaluate_loaded(self) -> dict[str, float] | None:
    """Held-out metrics of the student as loaded, before any training (a baseline, or a teacher's score)."""
    self.student_def, s_state = nnx.split(self.student)
    t_def, self.t_params, _ = self._teacher()
    self.eval_step = step_lib.make_eval_step(self.student_def, signals.online(t_def), self.loss_cfg)
    with jax.set_mesh(self.mesh):
      return self.evaluate({"student": nnx.to_pure_dict(s_state)})

  def _report(self, report, step: int, metrics) -> None:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.time()
    values["tokens_per_s"] = values["tokens"] / max(now - self._last_time, 1e-9)
    self._last_time = now
    nonfinite = values.pop("nonfinite", 0.0) > 0
    self.skipped += int(nonfinite)
    values["skipped_nonfinite"] = float(self.skipped)
    report.step(step, values)
    if not nonfinite:
      return
    what = (f"step {step}: the loss or gradients hold NaN or Inf (loss={values['loss']}, "
            f"grad_norm={values['grad_norm']})")
    if self.config.nonfinite == "stop":
      last = self.ckpt.latest_step()
      last = f"step {last}" if last is not None else "none yet (a rerun starts afresh, with any settings)"
      raise NonFiniteError(
          f"{what}; the update was not applied and the run stops (config.nonfinite=\"stop\"). The last checkpoint "
          f"is {last}. Look for bad rows or lower optimizer.lr; nonfinite=\"skip\" skips "
          "such steps instead")
    log.warning("%s; update skipped (%d skipped so far, config.nonfinite=\"skip\")", what, self.skipped)

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

  def samples(self, params, teacher_def, teacher_params) -> list[dict]:
    """Held-out prompts answered greedily by the trained student and the teacher (jaxkd.samples); [] when
    there is no held-out data. A failure here is logged, not raised: the run has already finished."""
    c = self.config
    if jax.process_count() > 1:  # each answer is a loop of small steps; not worth a collective per token
      log.info("closing samples: skipped in a run of %d processes", jax.process_count())
      return []
    template = data.resolve_template(c.data.chat_template, self.tokenizer)
    speakers = {"student": samples_lib.Speaker(nnx.merge(self.student_def, params["student"]), self.tokenizer,
                                               template)}
    if teacher_def is not None:
      t_tok = self.teacher_tokenizer or self.tokenizer
      t_template = data.teacher_template(c.data, t_tok, template) if self.teacher_tokenizer else template
      speakers["teacher"] = samples_lib.Speaker(nnx.merge(teacher_def, teacher_params), t_tok, t_template)
    try:
      with jax.set_mesh(self.mesh):
        return samples_lib.answer_held_out(c.data, speakers, count=c.samples.count,
                                           max_new_tokens=c.samples.max_new_tokens,
                                           cache_dir=os.path.join(self.workdir, "data_cache"))
    except Exception as e:  # noqa: BLE001
      log.warning("closing samples failed (the run itself finished and was saved): %s: %s", type(e).__name__, e)
      return []

  def export(self, params) -> str:
    student = nnx.merge(self.student_def, params["student"])  # the projector is never exported
    path = os.path.join(self.workdir, "export")
    models.save_pretrained(student, path, tokenizer=self.tokenizer, dtype=self.config.export.dtype)
    return path


def run(config) -> dict[str, Any]:
  return Run(config).train()
