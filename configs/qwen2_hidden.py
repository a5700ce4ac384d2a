"""Hidden-state distillation of Qwen2-7B (width 3584, 28 layers) into Qwen2-1.5B (width 1536, 28 layers):
every student layer is pulled toward the teacher's through a learned 1536 -> 3584 projection (trained,
checkpointed, never exported), alongside CE on the labels.

  python -m jaxkd.train --config configs/qwen2_hidden.py --config.workdir=/path/to/run
"""

from jaxkd.config_base import base_config, hub_defaults


def get_config():
  c = hub_defaults(base_config())
  c.workdir = "workdir/qwen2_hidden"
  c.student.path = "Qwen/Qwen2-1.5B"
  c.teacher.path = "Qwen/Qwen2-7B"
  c.distill.kind = "hidden"
  c.distill.alpha = 0.0  # CE weight 1 - alpha = 1
  c.distill.hidden.weight = 1.0
  c.distill.hidden.loss = "cosine"
  c.distill.hidden.layer_norm = True
  return c
