"""Tiny cross-tokenizer hidden-state distillation on a CPU in about a minute: a Llama teacher on its own
tokenizer (the bundled SentencePiece-style BPE, 512 tokens) into a StableLM student on the bundled 768-token
byte-level BPE. About three quarters of the student's tokens end where a teacher token ends (the loader's
summary at the start of the run says how many).

Each example is tokenized by both tokenizers; the hidden states meet only at aligned positions, where a
teacher token and a student token end at the same character of the text (logit KD is refused here: the
two vocabularies name different strings).

  python -m jaxkd.train --config configs/tiny_cross_tokenizer.py
"""

from jaxkd.config_base import base_config, tiny_defaults


def get_config():
  c = tiny_defaults(base_config())
  c.workdir = "workdir/tiny_cross_tokenizer"
  c.student.path = "tiny:stablelm-student"
  c.teacher.path = "tiny:llama-teacher-othertok"  # its tokenizer comes with it
  c.distill.kind = "hidden"
  c.distill.alpha = 0.0
  c.distill.hidden.weight = 1.0
  c.distill.hidden.loss = "mse"
  c.distill.hidden.layer_norm = True
  c.data.teacher_seq_len = 160  # the teacher's tokenizer needs about 1.05x the tokens for the same text
  return c
