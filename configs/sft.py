"""The vanilla baseline of the seed paper: the same Qwen2-1.5B student and data, no teacher (alpha = 0).

  python -m jaxkd.train --config configs/sft.py --config.workdir=/path/to/run

With alpha = 0 the train step has no teacher forward at all.
"""

import os

from jaxkd import config_base


def get_config():
  c = config_base.load(os.path.join(os.path.dirname(__file__), "qwen2_logit.py"))
  c.workdir = "workdir/sft"
  c.teacher.path = ""
  c.distill.alpha = 0.0
  return c
