"""Raw dataset rows to one canonical example: format detection, conversion, and what makes a row bad.

Every supported format becomes either a `Conversation` (messages with roles system/user/assistant/tool,
rendered later with a chat template) or a `Text` (plain text, trained from `train_from` on). A row that
cannot become one raises `BadRow` with a short, counted reason; the loader skips and counts those rows, or
stops on the first one when `data.strict=True`.

Tool calling takes the OpenAI layout as transformers' `apply_chat_template(messages, tools=...)` reads it:
assistant messages with `tool_calls` ({"type": "function", "function": {"name", "arguments"}}), `tool`
messages with `tool_call_id` and `name`, and a `tools` list of JSON schemas. The xLAM layout (`query`,
`tools`, `answers`) and the Glaive layout (`system` listing the functions, `chat` of `USER:` /
`ASSISTANT: <functioncall> {...}` / `FUNCTION RESPONSE:` turns) are converted to it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping, Sequence

FORMATS = ("sharegpt", "messages", "alpaca", "prompt_completion", "text", "xlam", "glaive")
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
    "no_trainable_token_after_truncation", "bad_tool_call",
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
  # {"role": one of ROLES, "content": str}, plus "tool_calls" (assistant; then "content" may be absent),
  # "tool_call_id" and "name" where the data gives them. Keys whose value is None are left out, as
  # apply_chat_template leaves them out: templates test `'tool_calls' in message`.
  messages: list[dict[str, Any]]
  tools: list | None = None  # function schemas for templates that render them ([] stays [])


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
  if {"query", "answers"} <= cols:
    return "xlam"
  if {"system", "chat"} <= cols:
    return "glaive"
  if "text" in cols:
    return "text"
  raise DataError(
      f"cannot tell the data format from the columns {sorted(cols)}: expected 'conversations' (ShareGPT), "
      "'messages' (OpenAI), 'instruction'+'output' (Alpaca), 'prompt'+'completion', 'query'+'answers' "
      "(xLAM), 'system'+'chat' (Glaive) or 'text'. Set the source's format=... or rename columns with "
      "columns={'conversations': 'your_column'}.")


def _plain(value: Any) -> Any:
  """Bytes to str, NumPy to Python, tuples to lists. Mappings keep their shape: a TFDS sequence is rebuilt
  only where a list of messages is expected (`_sequence`), never inside one (call arguments such as
  {"symbols": ["AAPL", "MSFT"]} or {"ids": []} look just like a columnar sequence)."""
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
    return {k: _plain(v) for k, v in value.items()}
  return value


def _sequence(value: Any) -> Any:
  """A TFDS Sequence({...}) decodes as {key: [values]} (columnar): rebuilt as the list of dicts it stands for.
  Called on a field that must hold a list of messages, where a mapping means nothing else."""
  if isinstance(value, Mapping) and value and all(type(v) is list for v in value.values()) and len(
      {len(v) for v in value.values()}) == 1:
    keys = list(value)
    return [dict(zip(keys, vals)) for vals in zip(*(value[k] for k in keys))]
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


def _json(value: Any, where: str, reason: str = "non_string_content") -> Any:
  """A field that may hold JSON text: parsed when it is a string."""
  if not isinstance(value, str):
    return value
  try:
    return json.loads(value)
  except json.JSONDecodeError:
    raise BadRow(reason, f"{where} is a string that is not JSON: {value[:60]!r}") from None


# -- tool calls ---------------------------------------------------------------------------------------------


def _arguments(value: Any, where: str) -> dict:
  """Call arguments as an object. A JSON string is parsed first, as vLLM does before rendering: templates
  apply `tojson` to the arguments, which would quote a string a second time. None or "" is no arguments."""
  if value is None or value == "":
    return {}
  value = _json(value, f"{where} arguments", "bad_tool_call")
  if not isinstance(value, dict):
    raise BadRow("bad_tool_call", f"{where} arguments are a {type(value).__name__}, not an object")
  return value


def _tool_call(call: Any, where: str) -> dict:
  """One call in OpenAI's form {"type": "function", "function": {"name", "arguments"}} (plus "id"); the flat
  {"name", "arguments"} that some datasets and xLAM use is wrapped into it."""
  if not isinstance(call, Mapping):
    raise BadRow("bad_tool_call", f"{where} is a {type(call).__name__}, not a dict")
  if "function" in call:
    function = call["function"]
    if not isinstance(function, Mapping):
      raise BadRow("bad_tool_call", f"{where} 'function' is a {type(function).__name__}, not a dict")
    call = {k: v for k, v in call.items() if v is not None}
  else:
    function = call
    call = {k: call[k] for k in ("id",) if call.get(k) is not None}
    call["type"] = "function"
  name = function.get("name")
  if not isinstance(name, str) or not name:
    raise BadRow("bad_tool_call", f"{where} has no function name")
  call["function"] = {**function, "name": name, "arguments": _arguments(function.get("arguments"), where)}
  return call


def _tool_calls(message: Mapping[str, Any], where: str) -> list[dict] | None:
  """The calls of an assistant message (`tool_calls`, or OpenAI's older single `function_call`); None when it
  makes none (an empty list included, which Llama 3.1's template would refuse as "not one call")."""
  calls = message.get("tool_calls")
  if calls is None and message.get("function_call") is not None:
    calls = [message["function_call"]]
  if calls is None:
    return None
  calls = _json(calls, f"{where} tool_calls", "bad_tool_call")
  if not isinstance(calls, list):
    raise BadRow("bad_tool_call", f"{where} tool_calls is a {type(calls).__name__}, not a list")
  return [_tool_call(c, f"{where} call {j}") for j, c in enumerate(calls)] or None


def _tools(value: Any) -> list | None:
  """A `tools` column: a list of function schemas (kept as given, [] included, as transformers passes it)
  or its JSON text; a single schema becomes a list of one."""
  if isinstance(value, str):
    if not value.strip():
      return None
    try:
      value = json.loads(value)
    except json.JSONDecodeError:
      return None  # a free-text tools column cannot be rendered as schemas; the turns still can
  if isinstance(value, Mapping):
    return [value]
  return value if isinstance(value, list) else None


def _parse_messages(raw: Any, field: str, role_key: str, content_key: str,
                    role_aliases: Mapping[str, str]) -> list[dict[str, Any]]:
  raw = _sequence(_json(raw, f"'{field}'"))
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
    canonical = role_aliases.get(str(role).lower()) if isinstance(role, str) else None
    if canonical is None:
      raise BadRow("unknown_role", f"message {i} has role {role!r}")
    calls = _tool_calls(message, f"message {i}")
    if calls is not None and canonical != "assistant":
      raise BadRow("bad_tool_call", f"message {i} ({canonical}) has tool_calls; only assistant turns call tools")
    if content is None and calls is None:
      raise BadRow("missing_field", f"message {i} has no '{content_key}'")
    out: dict[str, Any] = {"role": canonical}
    if content is not None:  # a call turn's null content is left out, as apply_chat_template leaves it out
      out["content"] = _content(content, f"message {i}")
    if calls is not None:
      out["tool_calls"] = calls
    for key in ("tool_call_id", "name"):
      value = message.get(key)
      if value is not None:
        if not isinstance(value, str):
          raise BadRow("non_string_content", f"message {i} '{key}' is {type(value).__name__}, not a string")
        out[key] = value
    messages.append(out)
  return messages


# -- xLAM and Glaive function-calling layouts ----------------------------------------------------------------

# xLAM's parameter types (Python spellings) as JSON-schema types.
_XLAM_TYPES = {"str": "string", "string": "string", "int": "integer", "integer": "integer", "float": "number",
               "number": "number", "bool": "boolean", "boolean": "boolean", "list": "array", "array": "array",
               "tuple": "array", "set": "array", "dict": "object", "object": "object"}
_OPTIONAL = re.compile(r",\s*optional\s*$", re.IGNORECASE)


def _xlam_type(spelling: str) -> dict:
  """{"type": ...} for an xLAM type such as "str", "List[int]" or "Dict[str, Any]" ({} for Any, unions, ...)."""
  head, _, inner = spelling.strip().partition("[")
  kind = _XLAM_TYPES.get(head.strip().lower())
  if kind is None:
    return {}
  out = {"type": kind}
  item = _XLAM_TYPES.get(inner.rstrip("]").strip().lower()) if kind == "array" and inner else None
  if item is not None and item not in ("array", "object"):
    out["items"] = {"type": item}
  return out


def _xlam_tool(tool: Any, where: str) -> dict:
  """An xLAM function ({"name", "description", "parameters": {arg: {"type": "str, optional", "description",
  "default"}}}) as an OpenAI tool with a JSON-schema `parameters`: an argument is required unless its type
  says "optional" or it has a default."""
  if not isinstance(tool, Mapping) or not isinstance(tool.get("name"), str):
    raise BadRow("bad_tool_call", f"{where} is not a function with a name")
  params = tool.get("parameters") or {}
  if isinstance(params, Mapping) and params.get("type") == "object":
    schema = dict(params)  # already a JSON schema
  elif isinstance(params, Mapping):
    properties, required = {}, []
    for arg, spec in params.items():
      spec = spec if isinstance(spec, Mapping) else {}
      spelling = str(spec.get("type", ""))
      optional = bool(_OPTIONAL.search(spelling))
      prop = _xlam_type(_OPTIONAL.sub("", spelling))
      prop.update({k: spec[k] for k in ("description", "default") if k in spec})
      properties[arg] = prop
      if not optional and "default" not in spec:
        required.append(arg)
    schema = {"type": "object", "properties": properties, "required": required}
  else:
    raise BadRow("bad_tool_call", f"{where} parameters are a {type(params).__name__}, not a dict")
  function = {"name": tool["name"]}
  if tool.get("description") is not None:
    function["description"] = tool["description"]
  function["parameters"] = schema
  return {"type": "function", "function": function}


def _xlam(row: Mapping[str, Any]) -> Conversation:
  query = _content(_field(row, "query"), "query")
  answers = _json(_field(row, "answers"), "'answers'", "bad_tool_call")
  if not isinstance(answers, list):
    raise BadRow("bad_tool_call", f"'answers' is a {type(answers).__name__}, not a list of calls")
  if not answers:
    raise BadRow("missing_field", "'answers' is empty: no call and no reply to train")
  tools = _json(row.get("tools") or [], "'tools'", "bad_tool_call")
  if not isinstance(tools, list):
    raise BadRow("bad_tool_call", f"'tools' is a {type(tools).__name__}, not a list of functions")
  calls = [_tool_call(a, f"answer {j}") for j, a in enumerate(answers)]
  return Conversation([{"role": "user", "content": query}, {"role": "assistant", "tool_calls": calls}],
                      tools=[_xlam_tool(t, f"tool {j}") for j, t in enumerate(tools)])


_GLAIVE_TURN = re.compile(r"^(USER|ASSISTANT|FUNCTION RESPONSE):[ \t]?", re.MULTILINE)
_GLAIVE_ROLE = {"USER": "user", "ASSISTANT": "assistant", "FUNCTION RESPONSE": "tool"}
_GLAIVE_END = "<|endoftext|>"  # Glaive closes each assistant turn with GPT-2's end token, as text
# Glaive quotes the arguments' JSON in single quotes: {"name": "f", "arguments": '{"a": 1}'}.
_GLAIVE_CALL = re.compile(r'^\{\s*"name"\s*:\s*"([^"]+)"\s*,\s*"arguments"\s*:\s*\'(.*)\'\s*\}$', re.DOTALL)


def _glaive_call(text: str, where: str) -> dict:
  text = text.strip()
  try:
    call = json.loads(text)
  except json.JSONDecodeError:
    match = _GLAIVE_CALL.match(text)
    if match is None:
      raise BadRow("bad_tool_call", f"{where}: cannot read the <functioncall> {text[:60]!r}") from None
    call = {"name": match.group(1), "arguments": match.group(2)}
  return _tool_call(call, where)


def _glaive_tools(system: str) -> tuple[str, list | None]:
  """The system prompt's prose and the function schemas listed after it (None when it lists none)."""
  system = re.sub(r"^\s*SYSTEM:\s*", "", system)
  start = system.find("{")
  if start < 0:
    return system.strip(), None
  decoder, tools, pos = json.JSONDecoder(), [], start
  while pos < len(system):
    try:
      schema, pos = decoder.raw_decode(system, pos)
    except json.JSONDecodeError:
      raise BadRow("bad_tool_call", f"the system prompt's function list is not JSON near {system[pos:pos + 60]!r}"
                   ) from None
    tools.append({"type": "function", "function": schema})
    while pos < len(system) and system[pos].isspace():
      pos += 1
  return system[:start].strip(), tools


def _glaive(row: Mapping[str, Any]) -> Conversation:
  prose, tools = _glaive_tools(_content(row.get("system") or "", "system"))
  chat = _content(_field(row, "chat"), "chat")
  parts = _GLAIVE_TURN.split(chat)  # [before, role, text, role, text, ...]
  if len(parts) < 3:
    raise BadRow("empty_conversation", "'chat' has no USER:/ASSISTANT: turns")
  messages = [{"role": "system", "content": prose}] if prose else []
  last_call = None
  for k in range(1, len(parts), 2):
    role, text = _GLAIVE_ROLE[parts[k]], parts[k + 1].strip()
    message: dict[str, Any] = {"role": role}
    if role == "assistant":
      text = text.removesuffix(_GLAIVE_END).rstrip()
      said, marker, call = text.partition("<functioncall>")
      if marker:
        message["tool_calls"] = [_glaive_call(call.removesuffix(_GLAIVE_END), f"turn {k // 2}")]
        last_call = message["tool_calls"][0]["function"]["name"]
        text = said.strip()
      if text or not marker:
        message["content"] = text
    else:
      message["content"] = text
      if role == "tool" and last_call is not None:
        message["name"] = last_call
    messages.append(message)
  return Conversation(messages, tools=tools)


def to_example(row: Mapping[str, Any], fmt: str, *, chat_prompt_completion: bool = True,
               role_aliases: Mapping[str, str] = ROLE_ALIASES) -> Conversation | Text:
  """Converts one raw row of format `fmt`; raises BadRow when it cannot."""
  row = {k: _plain(v) for k, v in row.items()}
  if fmt == "sharegpt":
    raw = _field(row, "conversations")
    return Conversation(_parse_messages(raw, "conversations", "from", "value", role_aliases))
  if fmt == "messages":
    return Conversation(_parse_messages(_field(row, "messages"), "messages", "role", "content", role_aliases),
                        tools=_tools(row.get("tools")))
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
    prompt, completion = _sequence(_field(row, "prompt")), _sequence(_field(row, "completion"))
    if isinstance(prompt, list) or isinstance(completion, list):  # conversational prompt/completion
      if not isinstance(prompt, list):
        prompt = [{"role": "user", "content": prompt}]
      if not isinstance(completion, list):
        completion = [{"role": "assistant", "content": completion}]
      return Conversation(_parse_messages(prompt + completion, "prompt", "role", "content", role_aliases),
                          tools=_tools(row.get("tools")))
    prompt, completion = _content(prompt, "prompt"), _content(completion, "completion")
    if chat_prompt_completion:
      return Conversation([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])
    return Text(prompt + completion, train_from=len(prompt))
  if fmt == "xlam":
    return _xlam(row)
  if fmt == "glaive":
    return _glaive(row)
  if fmt == "text":
    text = _content(_field(row, "text"), "text")
    if not text.strip():
      raise BadRow("empty_text", "the text is empty")
    return Text(text)
  raise DataError(f"unknown data format {fmt!r}; use one of {FORMATS} or 'auto'")
