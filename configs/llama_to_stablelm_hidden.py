"""The seed paper's cross-architecture case: Llama-3.1-8B (width 4096, 32 layers, Llama-3 tokenizer) into
StableLM-2-1.6B (width 2048, 24 layers, its own tokenizer).

The tokenizers differ, so there is no logit term: each example is tokenized by both models and the
hidden states are compared only where a teacher token and a student token end at the same character.
Student layer i meets teacher layer round(i * 32 / 24) through a learned 2048 -> 4096 projection.

  python -m jaxkd.train --config configs/llama_to_stablelm_hidden.py --config.workdir=/path/to/run
"""

from jaxkd.config_base import base_config, hub_defaults


def get_config():
  c = hub_defaults(base_config())
  c.workdir = "workdir/llama_to_stablelm_hidden"
  c.student.path = "stabilityai/stablelm-2-1_6b"
  c.teacher.path = "meta-llama/Llama-3.1-8B"
  c.distill.kind = "hidden"
  c.distill.alpha = 0.0
  c.distill.hidden.weight = 1.0
  c.distill.hidden.loss = "cosine"
  c.distill.hidden.layer_norm = True
  c.data.teacher_seq_len = 4096
  return c
