"""Trains the tiny teacher bundled in jaxkd/assets/teacher (configs/tiny_teacher.py) and installs it.

  python scripts/train_teacher.py [--config.steps=600 ...]

Deterministic from the config's seed on a CPU; takes a few minutes.
"""

import os
import shutil
import sys

from absl import app
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs", "tiny_teacher.py"),
                                          "Teacher training config.", lock_config=True)


def main(argv):
  del argv
  from jaxkd import tiny, trainer  # pylint: disable=import-outside-toplevel
  summary = trainer.run(_CONFIG.value)
  target = os.path.join(tiny.ASSETS, "teacher")
  shutil.rmtree(target, ignore_errors=True)
  shutil.copytree(summary["export"], target)
  ev = summary["eval"]
  print(f"teacher installed in {target}: held-out loss {ev['loss']:.4f}, accuracy {ev['accuracy']:.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(app.run(main))
