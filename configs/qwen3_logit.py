"""Logit distillation of Qwen3-8B into Qwen3-1.7B: forward KL at tau = 2, alpha = 0.5, as configs/qwen2_logit.py.

On a GPU box or TPU host (the same command on every host of a pod):

  python -m jaxkd.train --config configs/qwen3_logit.py \
      --config.workdir=/path/to/run

Both models have 151936 embedding rows and share Qwen3's tokenizer (151669 tokens); the rows past the tokenizer are
cut before the softmax, so they carry no probability. Qwen3-1.7B ties its output head to the embedding table,
Qwen3-8B does not.
"""

import os

from jaxkd import config_base


def get_config():
  # The Qwen2 pair's config, one place for every setting the two share.
  c = config_base.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen2_logit.py"))
  c.workdir = "workdir/qwen3_logit"
  c.student.path = "Qwen/Qwen3-1.7B"
  c.teacher.path = "Qwen/Qwen3-8B"
  return c
