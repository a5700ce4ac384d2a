"""`python -m jaxkd.train --config configs/qwen2_logit.py [--config.key=value ...]`: runs one distillation.

Rerunning the same command resumes from the latest checkpoint in the config's workdir.
"""

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and friends log every file they touch at INFO
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
  logging.getLogger("jaxkd").addHandler(handler)
  logging.getLogger("jaxkd").setLevel(logging.INFO)
  logging.getLogger("jaxkd").propagate = False  # absl's root handler would print it twice
  from jaxkd import trainer  # pylint: disable=import-outside-toplevel  (after flags: fast --help)
  summary = trainer.run(_CONFIG.value)
  ev = summary["eval"]
  print(f"done: {summary['step']} steps in {summary['workdir']}")
  if ev:
    print(f"held-out: loss {ev['loss']:.4f}, token accuracy {ev['accuracy']:.3f}, perplexity {ev['perplexity']:.2f}"
          + (f", agreement with teacher {ev['agreement']:.3f}" if "agreement" in ev else ""))
  if "export" in summary:
    print(f"exported student: {summary['export']}")


if __name__ == "__main__":
  app.run(main)
