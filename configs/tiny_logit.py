"""Tiny logit distillation that runs offline on a CPU in about a minute.

The bundled tiny teacher (trained by scripts/train_teacher.py) into a smaller random student (built on first use on
and the bundled chat data:

  python -m jaxkd.train --config configs/tiny_logit.py
"""

from jaxkd.config_base import base_config


def get_config():
  c = base_config()
  c.workdir = "workdir/tiny_logit"
  c.steps = 60
  c.checkpoint_every = 20
  c.student.path = "tiny:student"
  c.student.compute_dtype = "float32"
  c.teacher.path = "tiny:teacher-trained"  # bundled; made by scripts/train_teacher.py
  c.teacher.dtype = "float32"
  c.distill.alpha = 0.5
  c.distill.temperature = 2.0
  c.distill.chunk_size = 256
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 5
  c.data.eval_fraction = 0.05
  c.data.eval_batches = 4
  c.data.seq_len = 128
  c.data.batch_size = 8
  return c
