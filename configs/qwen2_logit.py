"""The seed paper's logit distillation: a Qwen2-7B teacher into a Qwen2-1.5B student, tau = 2, alpha = 0.5.

On a GPU box or TPU host (the same command on every host of a pod):

  python -m jaxkd.train --config configs/qwen2_logit.py \
      --config.workdir=/path/to/run

Qwen2-7B's embedding has 152064 rows and Qwen2-1.5B's 151936; both are cut to the tokenizer's 151646
tokens before the softmax, so the padded rows carry no probability.
"""

from jaxkd.config_base import base_config, hub_defaults


def get_config():
  c = hub_defaults(base_config())
  c.workdir = "workdir/qwen2_logit"
  c.student.path = "Qwen/Qwen2-1.5B"
  c.teacher.path = "Qwen/Qwen2-7B"
  c.distill.kind = "forward_kl"
  c.distill.temperature = 2.0
  c.distill.alpha = 0.5
  c.distill.chunk_size = 2048
  c.optimizer.weight_decay = 0.0
  return c
