"""Tiny cross-architecture hidden-state distillation on a CPU in about a minute: a Llama teacher into a
StableLM student of another width (a learned projection bridges 64 -> 96), plus CE on the labels.

  python -m jaxkd.train --config configs/tiny_hidden.py
"""

from jaxkd.config_base import base_config, tiny_defaults


def get_config():
  c = tiny_defaults(base_config())
  c.workdir = "workdir/tiny_hidden"
  c.student.path = "tiny:stablelm-student"
  c.teacher.path = "tiny:llama-teacher"
  c.distill.kind = "hidden"  # no logit term: loss = hidden.weight * hidden + (1 - alpha) * CE
  c.distill.alpha = 0.0
  c.distill.hidden.weight = 1.0
  c.distill.hidden.loss = "mse"
  c.distill.hidden.layer_norm = True
  return c
