"""Tiny logit distillation that runs offline on a CPU in about a minute.

The bundled tiny teacher (trained by scripts/train_teacher.py) into a smaller random student (built on first
use), on the bundled chat data:

  python -m jaxkd.train --config configs/tiny_logit.py
"""

from jaxkd.config_base import base_config, tiny_defaults


def get_config():
  c = tiny_defaults(base_config())
  c.workdir = "workdir/tiny_logit"
  c.student.path = "tiny:student"
  c.teacher.path = "tiny:teacher-trained"  # bundled; made by scripts/train_teacher.py
  c.distill.alpha = 0.5
  # tau = 1, not the seed paper's 2: this small student beats SFT at 1 and loses to it at 2
  # (scripts/kd_vs_sft.py; numbers in BENCHMARKS.md).
  c.distill.temperature = 1.0
  return c
