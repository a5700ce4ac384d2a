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
  c.distill.temperature = 2.0
  return c
