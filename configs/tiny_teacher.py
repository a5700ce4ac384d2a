"""Trains the bundled tiny teacher (SFT of the tiny:teacher architecture on the bundled chats, held-out
rows excluded), reproducibly from the seed. `scripts/train_teacher.py` runs it and copies the export to
jaxkd/assets/teacher, which the tiny configs then distil from:

  python scripts/train_teacher.py
"""

from jaxkd.config_base import base_config, tiny_defaults


def get_config():
  c = tiny_defaults(base_config())  # with them the same held-out rows as every tiny config
  c.workdir = "workdir/tiny_teacher"
  c.steps = 600
  c.checkpoint_every = 200
  c.student.path = "tiny:teacher"
  c.distill.alpha = 0.0
  c.distill.chunk_size = 512
  c.optimizer.warmup_steps = 20
  c.optimizer.min_lr_ratio = 0.05
  c.data.eval_batches = 8
  c.data.batch_size = 16
  c.export.dtype = "bfloat16"
  return c
