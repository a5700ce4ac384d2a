"""Held-out prompts: the first conversations of a run's eval split, cut before their first assistant turn
(and the whole held-out conversations, for `jaxkd.answers` and `jaxkd.function_calling`).

A run ends by answering a few of them with the student and the teacher (`jaxkd.samples`), so a reader sees
what distillation did in words as well as in held-out loss. The rows are the ones the eval loader holds out
(a named eval split, or `data.eval_fraction` of a map-style source's rows by the same hash), so the models
never trained on them.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from jaxkd.data.formats import ROLE_ALIASES, BadRow, Conversation, to_example
from jaxkd.data.sources import eval_rows, open_reader, parse_sources, source_format

_READ = 256  # rows read at a time while looking for held-out ones


@dataclasses.dataclass
class Prompt:
  messages: list[dict]  # the conversation up to (not including) its first assistant turn
  reference: str  # that assistant turn's content, as the data has it ("" for a turn that only calls tools)
  tools: list | None = None  # the row's function schemas, for the chat template
  calls: list | None = None  # that turn's tool_calls ({"type": "function", "function": {name, arguments}})


def held_out_prompts(cfg, count: int, *, cache_dir: str | None = None) -> list[Prompt]:
  """Up to `count` held-out prompts, in row order, from the first map-style source that holds rows out.

  Streaming sources are passed over (their held-out rows are known only by reading the stream)."""
  for spec in _holding_sources(cfg):
    out: list[Prompt] = []
    for example in _held_out_examples(spec, cfg, cache_dir):
      prompt = _first_prompt(example)
      if prompt is not None:
        out.append(prompt)
        if len(out) == count:
          return out
    return out
  return []


def held_out_conversations(cfg, *, cache_dir: str | None = None) -> Iterator[list[dict]]:
  """The whole conversations (messages with canonical roles) of every held-out row of every map-style source
  that holds rows out, in source and row order; rows the loader would skip, and plain text, are left out."""
  for example in held_out_examples(cfg, cache_dir=cache_dir):
    yield example.messages


def held_out_examples(cfg, *, cache_dir: str | None = None) -> Iterator[Conversation]:
  """`held_out_conversations` with each row's tools: the `Conversation`s themselves."""
  for spec in _holding_sources(cfg):
    yield from _held_out_examples(spec, cfg, cache_dir)


def _holding_sources(cfg):
  specs = parse_sources(list(cfg.sources), default_format=cfg.format, default_eval_split=cfg.eval_split)
  return [s for s in specs if not s.streaming and (s.eval_split is not None or cfg.eval_fraction)]


def _held_out_examples(spec, cfg, cache_dir) -> Iterator[Conversation]:
  aliases = {**ROLE_ALIASES, **dict(cfg.role_aliases or {})}
  named = spec.eval_split is not None
  reader = open_reader(spec, spec.eval_split if named else spec.split, cache_dir=cache_dir)
  fmt = source_format(spec, reader.column_names)
  for lo in range(0, reader.num_rows, _READ):
    hi = min(lo + _READ, reader.num_rows)
    held = np.ones(hi - lo, bool) if named else eval_rows(np.arange(lo, hi), cfg.eval_fraction, cfg.eval_seed)
    rows = reader.read(lo, hi)
    for i in np.flatnonzero(held):
      try:
        example = to_example(rows[i], fmt, chat_prompt_completion=cfg.chat_prompt_completion, role_aliases=aliases)
      except BadRow:
        continue  # the loader skips (and counts) such rows too
      if isinstance(example, Conversation):  # plain text has no turn to answer
        yield example


def _first_prompt(example: Conversation) -> Prompt | None:
  roles = [m["role"] for m in example.messages]
  if "assistant" not in roles or "user" not in roles[:roles.index("assistant")]:
    return None
  k = roles.index("assistant")
  turn = example.messages[k]
  return Prompt(messages=example.messages[:k], reference=turn.get("content") or "", tools=example.tools,
                calls=turn.get("tool_calls"))
