"""A run's closing samples: a few held-out prompts answered greedily by the student and by the teacher.

Held-out loss and agreement say how close the student came; these say it in words. The prompts are rows the
run held out (`jaxkd.data.prompts`), rendered with the chat template training used, and each model answers
with its own tokenizer (the teacher's may differ under hidden-state distillation).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxkd import data, generate


@dataclasses.dataclass
class Speaker:
  model: Any  # a jaxkd Transformer
  tokenizer: Any
  template: str | None  # Jinja chat template; None: the tokenizer's own


def answer_held_out(data_cfg, speakers: dict[str, Speaker], *, count: int, max_new_tokens: int,
                    cache_dir: str | None = None) -> list[dict]:
  """[{"prompt": messages, "reference": str, NAME: answer of each speaker}] for up to `count` held-out
  prompts that fit in a training row (data.seq_len tokens) for every speaker."""
  prompts = data.held_out_prompts(data_cfg, count, cache_dir=cache_dir)
  ids = {name: [generate.encode_messages(s.tokenizer, p.messages, template=s.template) for p in prompts]
         for name, s in speakers.items()}
  fits = [i for i in range(len(prompts)) if all(len(v[i]) < data_cfg.seq_len for v in ids.values())]
  out = [{"prompt": prompts[i].messages, "reference": prompts[i].reference} for i in fits]
  if not fits:
    return out
  for name, s in speakers.items():
    batch = [ids[name][i] for i in fits]
    room = s.model.cfg.max_position_embeddings - max(len(x) for x in batch)
    answers = generate.generate(s.model, batch, max_new_tokens=min(max_new_tokens, room),
                                eos_ids=generate.eos_ids_of(s.tokenizer), vocab_size=len(s.tokenizer))
    for row, tokens in zip(out, answers):
      row[name] = s.tokenizer.decode(tokens, skip_special_tokens=True).strip()
  return out


def format_samples(samples: list[dict], names: tuple[str, ...] = ("reference", "teacher", "student")) -> str:
  """The samples as text: each prompt's last user turn, then every answer under its name."""
  lines = []
  for row in samples:
    user = next(m["content"] for m in reversed(row["prompt"]) if m["role"] == "user")
    for name, text in (("prompt", user), *((n, row[n]) for n in names if n in row)):
      first, *rest = (text or "(nothing)").splitlines() or [""]
      lines.append(f"  {name + ':':<11}{first}")
      lines.extend(f"  {'':<11}{more}" for more in rest)
    lines.append("")
  return "\n".join(lines).rstrip()
