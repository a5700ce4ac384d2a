"""The seed paper's logit distillation: a Qwen2-7B teacher into a Qwen2-1.5B student, tau = 2, alpha = 0.5.

On a GPU box or TPU host (the same command on every host of a pod):

  python -m jaxkd.train --config configs/qwen2_logit.py \
      --config.workdir=/path/to/run --config.data.sources='[{"path": "teknium/OpenHermes-2.5"}]'

Qwen2-7B's embedding has 152064 rows and Qwen2-1.5B's 151936; both are cut to the tokenizer's 151646
tokens before the softmax, so the padded rows carry no probability.
"""

from jaxkd.config_base import base_config


def get_config():
  c = base_config()
  c.workdir = "workdir/qwen2_logit"
  c.steps = 5000
  c.checkpoint_every = 500
  c.eval_every = 500
  c.student.path = "Qwen/Qwen2-1.5B"
  c.student.param_dtype = "float32"
  c.student.compute_dtype = "bfloat16"
  c.student.remat = "dots_no_batch"
  c.teacher.path = "Qwen/Qwen2-7B"
  c.teacher.dtype = "bfloat16"
  c.distill.kind = "forward_kl"
  c.distill.temperature = 2.0
  c.distill.alpha = 0.5
  c.distill.chunk_size = 2048
  c.optimizer.lr = 2e-5
  c.optimizer.warmup_steps = 100
  c.optimizer.schedule = "cosine"
  c.optimizer.weight_decay = 0.0
  c.data.seq_len = 4096
  c.data.batch_size = 64
  c.data.eval_fraction = 0.01
  c.data.eval_batches = 16
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c
