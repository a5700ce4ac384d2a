"""Raw dataset rows to one canonical example: format detection, conversion, and what makes a row bad.

Every supported format becomes either a `Conversation` (messages with roles system/user/assistant/tool,
rendered later with a chat template) or a `Text` (plain text, trained from `train_from` on). A row that
cannot become one raises `BadRow` with a short, counted reason; the loader skips and counts those rows, or
stops on the first one when `data.strict=True`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

FORMATS = ("sharegpt", "messages", "alpaca", "prompt_completion", "text")
ROLES = ("system", "user", "assistant", "tool")

# Role spellings seen in ShareGPT-style and OpenAI-style datasets. A function call is something the model
# says, so it is an assistant turn; a function's answer comes from outside, so it is a tool turn.
ROLE_ALIASES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "model": "assistant", "function_call": "assistant",
    "tool": "tool", "function_response": "tool", "observation": "tool", "ipython": "tool", "function": "tool",
}

# Short reasons a row is skipped, in the order the summary lists them.
BAD_REASONS = (
    "missing_field", "empty_conversation", "unknown_role", "non_string_content", "empty_text",
    "template_error", "content_not_in_template", "no_trainable_token", "overlong_dropped",
    "no_trainable_token_after_truncation",
)


class DataError(ValueError):
  """The data or its configuration cannot be used; the message says what to change."""


class BadRow(Exception):
  """One row cannot become an example. `reason` is one of BAD_REASONS; `detail` says what was seen."""

  def __init__(self, reason: str, detail: str):
    assert reason in BAD_REASONS, reason
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


@dataclasses.dataclass
class Conversation:
  messages: list[dict[str, str]]  # {"role": one of ROLES, "content": str}
  tools: list | None = None  # function schemas for templates that render them


@dataclasses.dataclass
class Text:
  text: str
  train_from: int = 0  # the loss covers text[train_from:] (a prompt before it is context only)


def detect_format(columns: Sequence[str]) -> str:
  """The format a source's column names imply; DataError naming the fix when none fits."""
  cols = set(columns)
  if "conversations" in cols:
    return "sharegpt"
  if "messages" in cols:
    return "messages"
  if {"instruction", "output"} <= cols:
    return "alpaca"
  if {"prompt", "completion"} <= cols:
    return "prompt_completion"
  if "text" in cols:
    return "text"
  raise DataError(
      f"cannot tell the data format from the columns {sorted(cols)}: expected 'conversations' (ShareGPT), "
      "'messages' (OpenAI), 'instruction'+'output' (Alpaca), 'prompt'+'completion' or 'text'. Set the "
      "source's format=... or rename columns with columns={'conversations': 'your_column'}.")


def _plain(value: Any) -> Any:
  """Bytes to str, TFDS-style columnar sequences ({key: [..]}) to lists of dicts, NumPy to Python."""
  kind = type(value)
  if kind is str or value is None or kind is int or kind is float or kind is bool:
    return value  # the common case first: this runs on every field of every row
  if kind is bytes:
    return value.decode("utf-8", errors="replace")
  if kind is list or kind is tuple:
    return [_plain(v) for v in value]
  if hasattr(value, "tolist"):  # numpy arrays and scalars
    return _plain(value.tolist())
  if isinstance(value, Mapping):
    out = {k: _plain(v) for k, v in value.items()}
    lists = [v for v in out.values() if type(v) is list]
    if out and len(lists) == len(out) and not any(lists):
      return []  # an empty TFDS sequence ({key: [], ...}): no elements, so nothing to tell it from a mapping
    if out and len(lists) == len(out) and len({len(v) for v in lists}) == 1 and any(
        not isinstance(x, (dict, list)) for v in lists for x in v):
      # A TFDS Sequence({...}) of scalars decodes as {key: [values]}: rebuild the list of dicts.
      keys = list(out)
      return [dict(zip(keys, vals)) for vals in zip(*(out[k] for k in keys))]
    return out
  return value


def _field(row: Mapping[str, Any], name: str) -> Any:
  value = row.get(name)
  if value is None:
    raise BadRow("missing_field", f"no '{name}' field")
  return value


def _content(value: Any, where: str) -> str:
  if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
    value = "".join(str(p.get("text", "")) for p in value)  # OpenAI content parts, text only
  if not isinstance(value, str):
    raise BadRow("non_string_content", f"{where} content is {type(value).__name__}, not a string")
  return value


def _parse_messages(raw: Any, field: str, role_key: str, content_key: str,
                    role_aliases: Mapping[str, str]) -> list[dict[str, str]]:
  if isinstance(raw, str):
    try:
      raw = json.loads(raw)
    except json.JSONDecodeError:
      raise BadRow("non_string_content", f"'{field}' is a string that is not a JSON list") from None
  if not isinstance(raw, list):
    raise BadRow("missing_field", f"'{field}' is {type(raw).__name__}, not a list of messages")
  if not raw:
    raise BadRow("empty_conversation", f"'{field}' is empty")
  messages = []
  for i, message in enumerate(raw):
    if not isinstance(message, Mapping):
      raise BadRow("missing_field", f"message {i} is {type(message).__name__}, not a dict")
    # ShareGPT exports sometimes use role/content and OpenAI-style ones from/value: accept either.
    role = message.get(role_key, message.get("role" if role_key == "from" else "from"))
    content = message.get(content_key, message.get("content" if content_key == "value" else "value"))
    if role is None:
      raise BadRow("missing_field", f"message {i} has no '{role_key}'")
    if content is None:
      raise BadRow("missing_field", f"message {i} has no '{content_key}'")
    canonical = role_aliases.get(str(role).lower()) if isinstance(role, str) else None
    if canonical is None:
      raise BadRow("unknown_role", f"message {i} has role {role!r}")
    messages.append({"role": canonical, "content": _content(content, f"message {i}")})
  return messages


def to_example(row: Mapping[str, Any], fmt: str, *, chat_prompt_completion: bool = True,
               role_aliases: Mapping[str, str] = ROLE_ALIASES) -> Conversation | Text:
  """Converts one raw row of format `fmt`; raises BadRow when it cannot."""
  row = {k: _plain(v) for k, v in row.items()}
  if fmt == "sharegpt":
    raw = _field(row, "conversations")
    return Conversation(_parse_messages(raw, "conversations", "from", "value", role_aliases))
  if fmt == "messages":
    tools = row.get("tools")
    if isinstance(tools, str):
      try:
        tools = json.loads(tools) if tools.strip() else None
      except json.JSONDecodeError:
        tools = None  # a free-text tools column cannot be rendered as schemas; the turns still can
    return Conversation(_parse_messages(_field(row, "messages"), "messages", "role", "content", role_aliases),
                        tools=tools or None)
  if fmt == "alpaca":
    instruction = _content(_field(row, "instruction"), "instruction")
    extra = _content(row.get("input") or "", "input")
    output = _content(_field(row, "output"), "output")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    system = row.get("system")
    if isinstance(system, str) and system.strip():
      messages.insert(0, {"role": "system", "content": system})
    return Conversation(messages)
  if fmt == "prompt_completion":
    prompt, completion = _field(row, "prompt"), _field(row, "completion")
    if isinstance(prompt, list) or isinstance(completion, list):  # conversational prompt/completion
      if not isinstance(prompt, list):
        prompt = [{"role": "user", "content": prompt}]
      if not isinstance(completion, list):
        completion = [{"role": "assistant", "content": completion}]
      return Conversation(_parse_messages(prompt + completion, "prompt", "role", "content", role_aliases))
    prompt, completion = _content(prompt, "prompt"), _content(completion, "completion")
    if chat_prompt_completion:
      return Conversation([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])
    return Text(prompt + completion, train_from=len(prompt))
  if fmt == "text":
    text = _content(_field(row, "text"), "text")
    if not text.strip():
      raise BadRow("empty_text", "the text is empty")
    return Text(text)
  raise DataError(f"unknown data format {fmt!r}; use one of {FORMATS} or 'auto'")
