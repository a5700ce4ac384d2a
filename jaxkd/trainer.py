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

from jaxkd import checkpoint as ckpt_lib
from jaxkd import config_base, data, distributed, models, on_policy, program, reporting, step as step_lib
from jaxkd import samples as samples_lib
from jaxkd import tiny
from jaxkd import workdir as workdir_lib
from jaxkd.models import lora as lora_lib

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
  """Everything a run sets up once (each piece a function of jaxkd.program); `train()` then runs the loop.

  After construction `evaluate()` works: the steps are built (compiled at their first call).
  """

  def __init__(self, config):
    config_base.validate(config)  # every key, the data's included, before any file is read
    self.config = c = config
    distributed.initialize(c.distributed)  # before anything touches a device
    self.workdir = os.path.abspath(c.workdir)
    if distributed.is_main():
      os.makedirs(self.workdir, exist_ok=True)
    distributed.barrier("jaxkd:workdir")
    self.mesh = program.make_mesh(c)
    self.ckpt = workdir_lib.claim(self.workdir, c, self._checkpointer(), self._checkpointer)
    # With checkpoints present the run resumes (or fails loudly): it never starts afresh over them.
    self.resume_step = self.ckpt.latest_step()
    if self.resume_step is not None and self.resume_step > c.steps:
      raise config_base.ConfigError(
          f"config.steps={c.steps}, but {self.workdir} holds a checkpoint of step {self.resume_step}, past it: set "
          f"steps >= {self.resume_step} to resume (or finish) that run, or use another workdir")

    settings = step_lib.loss_config(c)  # what needs no model: whether a teacher is used, logit KD or not
    toks = program.load_tokenizers(c, settings)
    self.tokenizer, self.teacher_tokenizer = toks.student, toks.teacher
    # On resume the student's weights come from the checkpoint: it is built abstractly, nothing is read. A LoRA
    # student's checkpoint holds its adapters alone: its base weights are read from student.path, as the teacher's.
    resuming = self.resume_step is not None
    self.lora = lora_lib.settings(c.student.lora)
    self.student, self.teacher = program.load_models(c, self.mesh, settings,
                                                     abstract_student=resuming and self.lora is None)
    t_cfg = self.teacher.cfg if self.teacher is not None else None
    self.loss_cfg = program.loss_settings(c, self.student.cfg, t_cfg, toks)
    if c.debug.start_delay_s:
      log.info("start-up held for %s s (debug.start_delay_s)", c.debug.start_delay_s)
      time.sleep(c.debug.start_delay_s)
    self.projector = program.make_projector(c, self.loss_cfg, self.student.cfg, t_cfg, self.mesh, abstract=resuming)
    self.program = program.build(c, self.mesh, self.student, self.teacher, self.projector, self.loss_cfg,
                                 program.rollout_settings(c, self.loss_cfg, toks))
    self.loader, self.eval_loader = self._loaders()
    self.eval_start = self.eval_loader.get_state() if self.eval_loader is not None else None

  def _loaders(self):
    """(train loader, eval loader or None when no held-out data is configured)."""
    c = self.config
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
    train = make("train")
    if c.teacher.cache:
      train = self._cache_loader(train)
    try:
      return train, make("eval")
    except data.DataError as e:  # no held-out data configured: train without evaluation
      log.warning("no evaluation: %s", e)
      return train, None

  def _cache_loader(self, data_loader):
    """The train batches from the teacher cache, checked row by row against `data_loader`'s."""
    from jaxkd import teacher_cache  # pylint: disable=import-outside-toplevel
    from jaxkd.teacher_cache import loader as cache_loader, store  # pylint: disable=import-outside-toplevel

    c = self.config
    if c.debug.data_processes:
      raise config_base.ConfigError("config.debug.data_processes cannot imitate processes over a teacher cache")
    cache = teacher_cache.open(c.teacher.cache)
    if isinstance(cache, teacher_cache.DistillKitCapture):  # its rows are the training data
      data_loader.close()
      return cache_loader.DistillKitLoader(cache, seq_len=c.data.seq_len, batch_size=c.data.batch_size,
                                           process_index=jax.process_index(), process_count=jax.process_count(),
                                           steps=c.steps)
    cache_loader.check_identity(cache, store.identity(c, self.tokenizer, len(cache), with_teacher=False),
                                teacher_path=c.teacher.path)
    return cache_loader.CacheLoader(cache, data_loader, batch_size=c.data.batch_size,
                                    process_index=jax.process_index(), process_count=jax.process_count(),
                                    steps=c.steps)

  def _checkpointer(self) -> ckpt_lib.Checkpointer:
    c = self.config
    return ckpt_lib.Checkpointer(os.path.join(self.workdir, "checkpoints"), max_to_keep=c.max_to_keep,
                                 save_delay_s=float(c.debug.save_delay_s))

  def _initial_state(self):
    """The state at the newest checkpoint (restoring the data position too), or a fresh one."""
    prog = self.program
    if self.resume_step is not None:
      restored = self.ckpt.restore_latest(prog.abstract_state())
      if restored is None:
        raise ckpt_lib.CheckpointError(f"the checkpoints in {self.ckpt.directory} disappeared while starting; "
                                       "rerun to resume from what is there")
      self.resume_step, state, data_states, _ = restored
      self._set_data_states(data_states)
      return state
    sh = prog.state_shardings
    params = jax.device_put(prog.params, sh.params)  # a no-op for the loaded student; places a new projector
    opt_state = jax.jit(prog.optimizer.init, out_shardings=sh.opt_state)(params)
    return step_lib.TrainState(step=jax.device_put(jnp.int32(0), sh.step), params=params, opt_state=opt_state,
                               rng=prog.initial_rng())

  def train(self) -> dict[str, Any]:
    c = self.config
    state = self._initial_state()
    start = int(jax.device_get(state.step))
    self.meta = {"config": workdir_lib.config_dict(c), "data_processes": self.data_processes}
    if distributed.is_main():  # what the workdir holds, for the next start to compare with (jaxkd.workdir.claim)
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
        state = self._loop(state, start, report, watch)
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
        if c.export.lora_adapter:
          summary["export_adapter"] = self.adapter_path
      if c.samples.count:
        summary["samples"] = self.samples(state.params)
      if distributed.is_main():
        ckpt_lib.write_json(os.path.join(self.workdir, "summary.json"), summary)
      self.ckpt.close()
      return summary
    except BaseException:
      self._finish_saving_quietly()  # a save already under way is finished, not lost with the run
      raise
    finally:
      watch.close()

  def _loop(self, state, start: int, report, watch):
    c = self.config
    pending, self._last_time = None, time.time()
    for i in range(start, c.steps):
      step = i + 1
      self.ckpt.raise_if_failed()  # a failed background save stops the run now, not at the next save
      batch = self._global_batch(self.loader, poison=step == c.debug.poison_step)
      state, metrics = self._step_fn(step)(state, self.program.frozen, batch)
      if pending is not None:  # the previous step's numbers: reading them does not stall dispatch
        self._report(report, *pending)
      pending = (step, metrics)
      if c.debug.step_delay_s:
        time.sleep(c.debug.step_delay_s)
      preempted = watch.reached()
      if preempted or step % c.checkpoint_every == 0 or step == c.steps:
        # This step's numbers first: under nonfinite="stop" a NaN step must end the run before it is saved.
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

  def _step_fn(self, step: int):
    """The compiled step that runs step `step`: on-policy on the share distill.on_policy.fraction of the steps."""
    o = self.config.distill.on_policy
    if on_policy.chosen(self.config.seed, step, o.fraction, o.start_step):
      return self.program.on_policy_step
    return self.program.train_step

  def _save(self, state, step: int) -> None:
    self.ckpt.save(state, self._data_states(), self.meta, step=step)

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

  def _global_batch(self, loader, *, poison: bool = False, lc=None) -> dict:
    local = next(loader)
    local = {k: local[k] for k in (lc or self.loss_cfg).batch_keys()}
    if poison:  # debug.poison_step: a target id past the vocabulary makes the cross entropy NaN (test hook)
      local["targets"] = np.full_like(local["targets"], np.iinfo(np.int32).max)
    return data.global_batch(local, self.mesh)

  def evaluate_loaded(self) -> dict[str, float] | None:
    """Held-out metrics of the student as loaded, before any training (a baseline, or a teacher's score)."""
    with jax.set_mesh(self.mesh):
      return self.evaluate(self.program.params)

  def _report(self, report, step: int, metrics) -> None:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.time()
    values["tokens_per_s"] = values["tokens"] / max(now - self._last_time, 1e-9)
    self._last_time = now
    nonfinite = values.pop("nonfinite", 0.0) > 0
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
    log.warning("%s; update skipped (%d skipped so far, config.nonfinite=\"skip\")", what,
                values["skipped_nonfinite"])

  def evaluate(self, params) -> dict[str, float] | None:
    """Held-out metrics over the eval split (the same batches every time); None without eval data."""
    if self.eval_loader is None:
      return None
    self.eval_loader.set_state(self.eval_start)
    out = step_lib.evaluate(self.program.eval_step, params, self.program.frozen,
                            self._batches(self.eval_loader), self.program.eval_lc)
    if out is None:
      raise data.DataError("the eval split is empty: raise data.eval_fraction or check data.eval_split")
    return out

  def _batches(self, loader):
    while True:
      try:
        yield self._global_batch(loader, lc=self.program.eval_lc)
      except StopIteration:
        return

  def samples(self, params) -> list[dict]:
    """Held-out prompts answered greedily by the trained student and the teacher (jaxkd.samples); [] when
    there is no held-out data. A failure here is logged, not raised: the run has already finished."""
    c = self.config
    if jax.process_count() > 1:  # each answer is a loop of small steps; not worth a collective per token
      log.info("closing samples: skipped in a run of %d processes", jax.process_count())
      return []
    template = data.resolve_template(c.data.chat_template, self.tokenizer)
    speakers = {"student": samples_lib.Speaker(self.program.student(params), self.tokenizer, template)}
    if self.teacher is not None:
      t_tok = self.teacher_tokenizer or self.tokenizer
      t_template = data.teacher_template(c.data, t_tok, template) if self.teacher_tokenizer else template
      speakers["teacher"] = samples_lib.Speaker(self.teacher, t_tok, t_template)
    try:
      with jax.set_mesh(self.mesh):
        return samples_lib.answer_held_out(c.data, speakers, count=c.samples.count,
                                           max_new_tokens=c.samples.max_new_tokens,
                                           cache_dir=os.path.join(self.workdir, "data_cache"))
    except Exception as e:  # noqa: BLE001
      log.warning("closing samples failed (the run itself finished and was saved): %s: %s", type(e).__name__, e)
      return []

  def export(self, params) -> str:
    """The student as a Hugging Face folder (a LoRA student's adapters merged into its weights), and with
    export.lora_adapter its adapters as a PEFT folder beside it (`adapter_path`)."""
    c = self.config
    student = self.program.student(params)  # the projector is never exported
    path = os.path.join(self.workdir, "export")
    models.save_pretrained(student, path, tokenizer=self.tokenizer, dtype=c.export.dtype)
    if c.export.lora_adapter:
      models.hf_io.save_adapter(student, self.adapter_path, base_model=tiny.resolve(c.student.path),
                                dtype=c.export.dtype)
    return path

  @property
  def adapter_path(self) -> str:
    """Where export.lora_adapter writes the PEFT adapter folder."""
    return os.path.join(self.workdir, "export_adapter")


def run(config) -> dict[str, Any]:
  return Run(config).train()
