"""Runs over several processes: joining the JAX cluster, preemption notices, and small host-side gathers.

One process per host (or, in tests, several on one machine), each owning its local devices. `initialize`
joins them through `jax.distributed` before any device is touched; from then on `jax.devices()` lists every
process's devices and each jitted step is one program over all of them.

Preemption: a scheduler sends SIGTERM some time before it kills a job. `PreemptionWatch.reached()`, called
once per step, tells the loop to save the step it just ran and stop. With one process it is our own SIGTERM
handler; with several, it is JAX's preemption sync point, which spreads the notice that reached any one
process to all of them and picks one step at which every process saves, so their shards of a checkpoint
belong together.

A process that dies (kill -9, out of memory, a lost host) stops sending heartbeats; after
`distributed.heartbeat_timeout_s` JAX's coordination service aborts the others (SIGABRT, exit status
134) instead of leaving them waiting forever in a collective.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading

import jax
import numpy as np

log = logging.getLogger("jaxkd")

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


class DistributedConfigError(ValueError):
  """config.distributed (or the JAX_* variables) cannot describe a cluster; the message says which key."""


def settings(dcfg) -> dict | None:
  """{"coordinator", "num_processes", "process_id"} from config.distributed, falling back to the variables
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; {"coordinator": "auto"} lets JAX detect the
  cluster (Slurm, Open MPI, Cloud TPU); None for a single process."""
  coordinator = dcfg.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if not coordinator:
    return None
  if coordinator == "auto":
    return {"coordinator": "auto"}
  num = int(dcfg.num_processes or os.environ.get("JAX_NUM_PROCESSES", 0))
  pid = int(dcfg.process_id if dcfg.process_id >= 0 else os.environ.get("JAX_PROCESS_ID", -1))
  if num < 1:
    raise DistributedConfigError(
        f"config.distributed.num_processes={num}: with distributed.coordinator={coordinator!r} it must be the "
        "number of processes (or set JAX_NUM_PROCESSES); on Slurm, Open MPI or Cloud TPU use "
        "distributed.coordinator='auto'")
  if not 0 <= pid < num:
    raise DistributedConfigError(
        f"config.distributed.process_id={pid}: must be in [0, {num}); give each process its own id "
        f"0..{num - 1} (--config.distributed.process_id=i or JAX_PROCESS_ID)")
  return {"coordinator": coordinator, "num_processes": num, "process_id": pid}


def initialize(dcfg) -> bool:
  """Joins the cluster described by config.distributed; True when this run has several processes.

  Must run before anything touches a device (JAX fixes its device list on first use)."""
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  s = settings(dcfg)
  if s is None:
    return False
  timeouts = dict(initialization_timeout=int(dcfg.initialization_timeout_s),
                  heartbeat_timeout_seconds=int(dcfg.heartbeat_timeout_s))
  # CPU processes exchange collectives over TCP (gloo); it is the default in recent JAX, set here so older
  # defaults cannot silently leave cross-process collectives unimplemented. GPUs and TPUs ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    if s["coordinator"] == "auto":
      jax.distributed.initialize(**timeouts)
    else:
      jax.distributed.initialize(coordinator_address=s["coordinator"], num_processes=s["num_processes"],
                                 process_id=s["process_id"], **timeouts)
  except Exception as e:  # noqa: BLE001  (re-raised with what to check)
    raise RuntimeError(
        f"joining the cluster at distributed.coordinator={s['coordinator']!r} failed: {e}. Check that every "
        "process was started with the same coordinator and num_processes, that process 0 runs and its port "
        "is reachable, and that nothing touched a JAX device before trainer.run") from e
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


class PreemptionWatch:
  """`reached()`: True at the step at which this run should save and stop after a SIGTERM.

  Call it once per step on every process (the multi-process sync point counts on it). `close()` puts the
  previous SIGTERM handler back.

  JAX's sync point is the fastest process's last counter + 1, and a process that has not called yet counts
  as 0. So the counter is this start's number of calls (1 at its first step), not the global step: a notice
  that lands during a resumed run's restore or compile (every counter still 0) then picks the first step,
  where the global step (resumed from 3, first step 4) would pick 1, a point no process ever reaches.
  """

  def __init__(self):
    self.multi = jax.process_count() > 1
    self.signalled = False
    self._calls = 0
    self._previous = None
    # With several processes JAX's preemption service owns SIGTERM (a handler of ours would hide the notice
    # from it); with one, a flag is all it takes. Handlers can only be installed from the main thread.
    if not self.multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.signalled = True

  def reached(self) -> bool:
    self._calls += 1
    if self.multi:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return bool(multihost_utils.reached_preemption_sync_point(self._calls))
    return self.signalled

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def gather_json(obj) -> list:
  """`obj` (JSON-serialisable) of every process, in process order; every process must call it."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:raw.size] = raw
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(rows[i, :sizes[i]]).decode()) for i in range(len(sizes))]


def all_true(ok: bool) -> bool:
  """True when `ok` holds on every process (so they all take the same branch)."""
  if jax.process_count() == 1:
    return bool(ok)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(np.asarray(multihost_utils.process_allgather(np.array([bool(ok)]))).all())


def barrier(name: str) -> None:
  """Waits until every process got here (after process 0 changed files the others are about to read)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def is_main() -> bool:
  return jax.process_index() == 0
