"""`python -m jaxkd.train --config configs/qwen2_logit.py [--config.key=value ...]`: runs one distillation.

Rerunning the same command resumes from the newest finished checkpoint in the config's workdir, after a
crash, a kill -9 or a preemption alike; the resumed run computes bitwise what an uninterrupted one would
have (same devices). A workdir holding a run of another config is refused unless --config.overwrite=True.

Exit status:
  0    finished: trained, evaluated, exported.
  75   preempted (EX_TEMPFAIL, "try again later"): a SIGTERM arrived, the step reached was checkpointed (during
       start-up, before the first step of this start: stopped at once, with nothing new to save; with several
       processes, once they have joined, JAX holds the notice and all of them save the first step they run).
       Rerun the same command to resume.
  1    an error, printed as `error: ...`: a bad config value, weights or data; checkpoints none of which can
       be restored; a failed save (a full disk); NaN/Inf under nonfinite="stop". Nothing already saved is
       lost: the last finished checkpoint stays.
  134  several processes, one died (killed, out of memory, host lost): once distributed.heartbeat_timeout_s
       passes without its heartbeat, JAX aborts the others (SIGABRT). Restart them all to resume.

Several processes (one per host, or several on one machine): start the same command in each with
  --config.distributed.coordinator=HOST:PORT --config.distributed.num_processes=N
  --config.distributed.process_id=I
(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; distributed.coordinator=auto on Slurm,
Open MPI or Cloud TPU). Process 0 writes the metrics and the export; all of them write the checkpoint.
"""

import gc
import logging
import os
import signal
import sys
import traceback

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
flags.mark_flags_as_required(["config"])

EXIT_PREEMPTED = 75  # EX_TEMPFAIL from sysexits.h: "try again later", which is what a preempted run should do


class _SigtermAtStart(BaseException):  # not Exception: no `except Exception` on the way may swallow it
  """A SIGTERM before the training loop's own handler was in place (start-up, restore, compile)."""


def _raise_sigterm_at_start(signum, frame):
  del signum, frame
  raise _SigtermAtStart()


def main(argv):
  del argv
  # Until the loop installs its handler (which saves the step it reaches, then stops), a SIGTERM stops the
  # start-up at once: nothing new exists to save, and a scheduler keyed on 75 reruns the command. Several
  # processes: once they join, JAX's preemption service takes SIGTERM over (see jaxkd.distributed).
  before = signal.signal(signal.SIGTERM, _raise_sigterm_at_start)
  try:
    return _main()
  except _SigtermAtStart:
    print("preempted (SIGTERM) while starting, before any step of this start: nothing new to save; rerun the "
          "same command to resume", file=sys.stderr, flush=True)
    return EXIT_PREEMPTED
  finally:
    signal.signal(signal.SIGTERM, before)


def _main():
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and friends log every file they touch at INFO
  config = _CONFIG.value
  handler = logging.StreamHandler()
  tag = f"[{config.distributed.process_id}] " if config.distributed.num_processes > 1 else ""
  handler.setFormatter(logging.Formatter(f"%(asctime)s {tag}%(message)s", datefmt="%H:%M:%S"))
  logging.getLogger("jaxkd").addHandler(handler)
  logging.getLogger("jaxkd").setLevel(logging.INFO)
  logging.getLogger("jaxkd").propagate = False  # absl's root handler would print it twice
  from jaxkd import trainer  # pylint: disable=import-outside-toplevel  (after flags: fast --help)
  try:
    if config.aot.topology:  # compile for a TPU slice and report; train nothing
      from jaxkd import aot  # pylint: disable=import-outside-toplevel
      return aot.report(config)
    summary = trainer.run(config)
  except trainer.Preempted as e:
    print(e, file=sys.stderr, flush=True)
    return EXIT_PREEMPTED
  except Exception as e:  # pylint: disable=broad-except
    if not isinstance(e, trainer.EXPECTED_ERRORS):
      traceback.print_exc()
    gc.collect()  # background failures (e.g. Orbax's unretrieved futures) report now, not after the message
    print(f"error: {e}", file=sys.stderr, flush=True)
    # A failed save leaves futures nobody awaited; at exit asyncio would log each one again, after (and
    # burying) the message above, which already says what failed.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    import jax  # pylint: disable=import-outside-toplevel
    if jax.distributed.is_initialized() and jax.process_count() > 1:
      # Skip the orderly shutdown, which waits for every process: the others may be blocked in a collective
      # that needs this one. Gone, it stops heartbeating and they abort after distributed.heartbeat_timeout_s.
      sys.stdout.flush()
      os._exit(1)
    return 1
  ev = summary["eval"]
  print(f"done: {summary['step']} steps in {summary['workdir']}")
  if ev:
    print(f"held-out: loss {ev['loss']:.4f}, token accuracy {ev['accuracy']:.3f}, perplexity {ev['perplexity']:.2f}"
          + (f", agreement with teacher {ev['agreement']:.3f}" if "agreement" in ev else ""))
  if summary.get("samples"):
    from jaxkd import samples  # pylint: disable=import-outside-toplevel
    print(f"held-out prompts, answered greedily:\n{samples.format_samples(summary['samples'])}")
  if "export" in summary:
    print(f"exported student: {summary['export']}")
  if "export_adapter" in summary:
    print(f"exported LoRA adapter (PEFT): {summary['export_adapter']}")
  return 0


if __name__ == "__main__":
  app.run(main)
