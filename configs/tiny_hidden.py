"""Tiny cross-architecture hidden-state distillation on a CPU in about a minute: a Llama teacher into a
StableLM student of another width (a learned projection bridges 64 -> 96), plus CE on the labels.

  python -m jaxkd.train --config configs/tiny_hidden.py
"""

from jaxkd.config_base import base_config


def get_config():
  c = base_config()
  c.workdir = "workdir/tiny_hidden"
  c.steps = 60
  c.checkpoint_every = 20
  c.student.path = "tiny:stablelm-student"
  c.student.compute_dtype = "float32"
  c.teacher.path = "tiny:llama-teacher"
  c.teacher.dtype = "float32"
  c.distill.kind = "hidden"  # no logit term: loss = hidden.weight * hidden + (1 - alpha) * CE
  c.distill.alpha = 0.0
  c.distill.hidden.weight = 1.0
  c.distill.hidden.loss = "mse"
  c.distill.hidden.layer_norm = True
  c.distill.chunk_size = 256
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 5
  c.data.eval_fraction = 0.05
  c.data.eval_batches = 4
  c.data.seq_len = 128
  c.data.batch_size = 8
  return c
