"""The vanilla baseline of the seed paper: the same Qwen2-1.5B student and data, no teacher (alpha = 0).

  python -m jaxkd.train --config configs/sft.py --config.workdir=/path/to/run

With alpha = 0 the train step has no teacher forward at all.
"""

import importlib.util
import os


def get_config():
  spec = importlib.util.spec_from_file_location("qwen2_logit", os.path.join(os.path.dirname(__file__),
                                                                            "qwen2_logit.py"))
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  c = base.get_config()
  c.workdir = "workdir/sft"
  c.teacher.path = ""
  c.distill.alpha = 0.0
  return c
