"""Helpers for tests of whole runs: a config file loaded with overrides, or `python -m jaxkd.train` started on it,
interrupted, and what its workdir holds."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

from jaxkd import config_base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The test process computes in "highest" matmul precision (conftest); the runs it starts must too, for
# their numbers to be bitwise comparable with runs made in the test process.
ENV = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest", "PYTHONUNBUFFERED": "1"}


def load_config(name: str = "tiny_logit", **overrides):
  """configs/<name>.py with dotted overrides ({"data.seq_len": 64}), as trainer.run takes it."""
  return config_base.load(os.path.join(ROOT, "configs", f"{name}.py"), overrides)


def command(workdir: str, config: str = "tiny_logit", **overrides) -> list[str]:
  cmd = [sys.executable, "-m", "jaxkd.train", "--config", os.path.join(ROOT, "configs", f"{config}.py"),
         f"--config.workdir={workdir}"]
  return cmd + [f"--config.{k}={v}" for k, v in overrides.items()]


class Proc:
  """A started command whose output goes to a file (a pipe nobody reads would block it)."""

  def __init__(self, cmd: list[str], log_path: str, env: dict | None = None):
    self.log_path = log_path
    self._log = open(log_path, "w")
    self.popen = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=env or ENV)

  def output(self) -> str:
    if not self._log.closed:
      self._log.flush()
    with open(self.log_path) as f:
      return f.read()

  def tail(self, n: int = 3000) -> str:
    return self.output()[-n:]

  def wait_for(self, condition, what: str, timeout: float = 400.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
      if condition():
        return
      if self.popen.poll() is not None:
        raise AssertionError(f"the run exited ({self.popen.returncode}) before {what}:\n{self.tail()}")
      time.sleep(0.02)
    self.popen.kill()
    raise AssertionError(f"timed out waiting for {what}:\n{self.tail()}")

  def signal(self, sig) -> None:
    self.popen.send_signal(sig)

  def kill(self) -> None:
    self.popen.send_signal(signal.SIGKILL)
    self.wait()

  def wait(self, timeout: float = 400.0) -> int:
    try:
      return self.popen.wait(timeout)
    finally:
      self._log.close()


def run(cmd: list[str], log_path: str, timeout: float = 400.0, env: dict | None = None) -> tuple[int, str]:
  p = Proc(cmd, log_path, env)
  rc = p.wait(timeout)
  return rc, p.output()


def metric_rows(workdir: str) -> list[dict]:
  """Lines of metrics.jsonl that parse (a line being written can be cut short)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return rows


def train_rows(workdir: str) -> list[dict]:
  return [r for r in metric_rows(workdir) if "loss" in r]


def last_step(workdir: str) -> int:
  rows = train_rows(workdir)
  return rows[-1]["step"] if rows else 0


def finished_steps(workdir: str) -> list[int]:
  folder = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def unfinished(workdir: str, step: int | str = "*") -> list[str]:
  return glob.glob(os.path.join(workdir, "checkpoints", f"{step}.orbax-checkpoint-tmp*"))


def export_bytes(workdir: str) -> bytes:
  with open(os.path.join(workdir, "export", "model.safetensors"), "rb") as f:
    return f.read()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


TRAIN_KEYS = ("loss", "kd", "ce", "grad_norm", "lr", "tokens", "accuracy", "skipped_nonfinite")


def assert_same_rows(got: list[dict], want: list[dict], keys=TRAIN_KEYS) -> None:
  """Every step's numbers equal, bitwise (float equality of the logged float32 values)."""
  assert [r["step"] for r in got] == [r["step"] for r in want], ([r["step"] for r in got], [r["step"] for r in want])
  for a, b in zip(got, want):
    for key in keys:
      assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))
