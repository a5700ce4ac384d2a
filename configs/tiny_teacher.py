"""Trains the bundled tiny teacher (SFT of the tiny:teacher architecture on the bundled chats, held-out
rows excluded), reproducibly from the seed. `scripts/train_teacher.py` runs it and copies the export to
jaxkd/assets/teacher, which the tiny configs then distil from:

  python scripts/train_teacher.py
"""

from jaxkd.config_base import base_config


def get_config():
  c = base_config()
  c.workdir = "workdir/tiny_teacher"
  c.steps = 600
  c.checkpoint_every = 200
  c.student.path = "tiny:teacher"
  c.student.compute_dtype = "float32"
  c.distill.alpha = 0.0
  c.distill.chunk_size = 512
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 20
  c.optimizer.min_lr_ratio = 0.05
  c.data.eval_fraction = 0.05  # the same held-out rows as every tiny config (data.eval_seed = 0)
  c.data.eval_batches = 8
  c.data.seq_len = 128
  c.data.batch_size = 16
  c.export.dtype = "bfloat16"
  return c
