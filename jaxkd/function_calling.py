"""Function-calling turns of tool conversations, the calls a reply makes, and their check as the Berkeley
Function Calling Leaderboard's (BFCL) AST checker does it. No JAX here: `jaxkd.eval --task function_calling`
generates the replies.

    found = function_calling.turns(conversations)   # one Turn per assistant turn of a conversation with tools
    syntax = function_calling.syntax_of(side)        # how the chat template writes a call: "hermes", ...
    said = function_calling.parse(reply, syntax)     # the calls a reply makes, and the ones it botched
    function_calling.check(turn, said)               # None when right, else why it is wrong (one of ERRORS)
    function_calling.score(found.turns, verdicts, found.skipped)

A turn's category, as BFCL names them: simple (one tool offered, one call expected), multiple (several tools
offered, one call), parallel (several calls in the turn), no_call (a turn answered in words: BFCL's
"irrelevance", where no tool fits; here also the turn that answers from a tool's result). A no_call turn is
right when the reply makes no call, so a model that never calls gets every one of them right: read the
categories, not only the overall share.

A produced call is right for an expected one (BFCL's simple_function_checker) when the function name is the
same; every argument the tool's JSON schema requires is present; none is unknown to the schema; each value
has the schema's type (an integer passes where the schema says number; a bool is never a number) and equals
the expected value once normalised: strings as BFCL's `standardize_string` (lower case, without spaces or
any of , . / - _ * ^, single quotes as double), an integer equal to its float, in lists and objects at any
depth (BFCL goes one level deep). An argument the expected call leaves out may be given only with the schema's default;
an optional one the expected call sets may be left out unless the schema's default differs from it. Calls in
one turn match in any order: a perfect bipartite matching of expected to produced calls (BFCL matches
greedily, which can miss a matching that exists). BFCL's lists of several acceptable values per argument do
not exist in chat data: the data's own call is the one answer.

Call syntaxes: "hermes" (Hermes / Qwen2.5: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks,
text around them allowed), "llama3_json" (Llama 3.1: the reply is `{"name": ..., "parameters": {...}}`,
optionally after `<|python_tag|>`, several separated by ";") and "inline" (`<tool_call>{"name": ..., arg:
value}</tool_call>`, the bundled chats' form). `syntax_of` renders a probe call through the chat template and
takes the syntax that reads it back exactly. A call that cannot be read (bad JSON, no name, an unclosed block)
makes the turn wrong ("malformed"), never a crash.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from typing import Any, Iterable, Mapping

from jaxkd.data.formats import BadRow, Conversation, to_example

CATEGORIES = ("simple", "multiple", "parallel", "no_call")
# Why a turn is wrong, in the order a check finds them.
ERRORS = ("malformed", "unexpected_call", "no_call", "wrong_count", "wrong_name", "missing_required",
          "unknown_argument", "unexpected_argument", "missing_optional", "wrong_type", "wrong_value", "no_match")


@dataclasses.dataclass(frozen=True)
class Call:
  name: str
  arguments: dict


@dataclasses.dataclass(frozen=True)
class Turn:
  messages: list[dict]  # the conversation before this assistant turn, as the data has it
  tools: list  # the function schemas offered
  expected: tuple[Call, ...]  # the data's calls in this turn; () for a turn answered in words
  category: str  # one of CATEGORIES
  reference: str = ""  # the data's text in this turn


@dataclasses.dataclass(frozen=True)
class Said:
  """The calls a reply makes, and its attempts at a call that could not be read (why, for each)."""
  calls: tuple[Call, ...] = ()
  malformed: tuple[str, ...] = ()


@dataclasses.dataclass
class Found:
  turns: list[Turn]
  skipped: collections.Counter  # assistant turns not scored, by reason


# ---------------------------------------------------------------------------------------------------------
# Turns of tool conversations
# ---------------------------------------------------------------------------------------------------------


def _function(tool: Any) -> Mapping | None:
  """A tool's function ({"name", "parameters", ...}), from OpenAI's {"type": "function", "function": ...} or
  the bare function."""
  function = tool.get("function", tool) if isinstance(tool, Mapping) else None
  return function if isinstance(function, Mapping) and isinstance(function.get("name"), str) else None


def parameters(tools: Iterable) -> dict[str, dict]:
  """{function name: its parameters' JSON schema ({} when it gives none)}."""
  out = {}
  for tool in tools or ():
    function = _function(tool)
    if function is not None:
      schema = function.get("parameters")
      out[function["name"]] = dict(schema) if isinstance(schema, Mapping) else {}
  return out


def _expected(message: Mapping) -> tuple[Call, ...]:
  return tuple(Call(c["function"]["name"], dict(c["function"]["arguments"])) for c in message.get("tool_calls", ()))


def turns(conversations: Iterable[Conversation], *, limit: int | None = None) -> Found:
  """Every assistant turn of the conversations that offer tools, in order (the first `limit`), each with the
  conversation before it. Turns of conversations without tools are skipped as "no_tools", turns that call a
  function the conversation does not offer as "unknown_tool" (there is no schema to check them by)."""
  out = Found([], collections.Counter())
  for conversation in conversations:
    if limit is not None and len(out.turns) >= limit:
      break
    offered = parameters(conversation.tools)
    for k, message in enumerate(conversation.messages):
      if message["role"] != "assistant":
        continue
      if not offered:
        out.skipped["no_tools"] += 1
        continue
      expected = _expected(message)
      if any(c.name not in offered for c in expected):
        out.skipped["unknown_tool"] += 1
        continue
      category = ("no_call" if not expected else "parallel" if len(expected) > 1
                  else "simple" if len(offered) == 1 else "multiple")
      out.turns.append(Turn(conversation.messages[:k], list(conversation.tools), expected, category,
                            message.get("content") or ""))
  out.turns = out.turns[:limit]
  return out


def from_bundled(messages: list[dict]) -> Conversation | None:
  """A bundled chat that calls tools (jaxkd.data.synthetic's text form: calls written in the reply) in the
  OpenAI layout, as chat_tools_openai.jsonl holds it; None for a chat that calls none."""
  from jaxkd.data import synthetic  # pylint: disable=import-outside-toplevel

  turns_ = [(m["role"], m["content"]) for m in messages]
  return to_example(synthetic.openai_tool_row(turns_), "messages") if synthetic.calls_tools(turns_) else None


# ---------------------------------------------------------------------------------------------------------
# Reading the calls in a reply
# ---------------------------------------------------------------------------------------------------------

_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"


def _object(text: str) -> tuple[dict | None, str | None]:
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    return None, f"not JSON ({e.msg}): {text[:60]!r}"
  return (value, None) if isinstance(value, dict) else (None, f"a JSON {type(value).__name__}, not an object")


def _call(obj: dict, key: str | None) -> tuple[Call | None, str | None]:
  """A call from a decoded object: its arguments under `key` (an object, or a JSON string of one), or with
  key None every member but "name"."""
  name = obj.get("name")
  if not isinstance(name, str) or not name:
    return None, "no function name"
  if key is None:
    return Call(name, {k: v for k, v in obj.items() if k != "name"}), None
  if key not in obj:
    return None, f"no {key!r}"
  arguments = obj[key]
  if isinstance(arguments, str):
    arguments, problem = _object(arguments)
    if problem:
      return None, f"{key} {problem}"
  if not isinstance(arguments, dict):
    return None, f"{key} are a {type(arguments).__name__}, not an object"
  return Call(name, arguments), None


def _blocks(reply: str, key: str | None) -> Said:
  calls, malformed = [], []
  for block in _BLOCK.findall(reply):
    obj, problem = _object(block.strip())
    call, problem = (None, problem) if problem else _call(obj, key)
    (malformed.append(problem) if problem else calls.append(call))
  unclosed = reply.count("<tool_call>") - len(_BLOCK.findall(reply))
  malformed += ["an unclosed <tool_call>"] * max(unclosed, 0)
  return Said(tuple(calls), tuple(malformed))


def _llama3_json(reply: str) -> Said:
  text = reply.strip()
  tagged = text.startswith(_PYTHON_TAG)
  text = text.removeprefix(_PYTHON_TAG).strip()
  if not text.startswith("{"):
    return Said(malformed=("<|python_tag|> without a JSON call",)) if tagged else Said()
  decoder, calls, pos = json.JSONDecoder(), [], 0
  while pos < len(text):
    try:
      obj, pos = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      return Said(malformed=(f"not JSON ({e.msg}): {text[pos:pos + 60]!r}",))
    if not isinstance(obj, dict):
      return Said(malformed=(f"a JSON {type(obj).__name__}, not an object",))
    call, problem = _call(obj, "parameters" if "parameters" in obj else "arguments")
    if problem:
      return Said(malformed=(problem,))
    calls.append(call)
    while pos < len(text) and (text[pos].isspace() or text[pos] == ";"):
      pos += 1
  return Said(tuple(calls))


SYNTAXES = {
    "hermes": lambda reply: _blocks(reply, "arguments"),
    "llama3_json": _llama3_json,
    "inline": lambda reply: _blocks(reply, None),
}


def parse(reply: str, syntax: str) -> Said:
  """The calls `reply` makes in `syntax` (one of SYNTAXES)."""
  if syntax not in SYNTAXES:
    raise ValueError(f"unknown call syntax {syntax!r}; use one of {', '.join(SYNTAXES)}")
  return SYNTAXES[syntax](reply)


def reply_text(tokenizer, ids: list[int], eos_ids) -> str:
  """A generated reply as text, without its closing end token and with special tokens kept: Llama's
  <|python_tag|> starts a call."""
  if ids and ids[-1] in set(eos_ids):
    ids = ids[:-1]
  return tokenizer.decode(ids, skip_special_tokens=False).strip()


# A call rendered through a chat template tells which syntax its model writes.
PROBE_TOOLS = [{"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}, "offset": {"type": "integer"}},
                   "required": ["zone"]}}}]
PROBE_CALL = Call("get_time", {"zone": "UTC", "offset": 2})
PROBE_MESSAGES = [{"role": "user", "content": "What time is it two hours east of UTC?"},
                  {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                      "name": PROBE_CALL.name, "arguments": PROBE_CALL.arguments}}]}]


def rendered_call(side) -> str:
  """What the model writes for PROBE_CALL under `side`'s chat template (a `jaxkd.data.encode.Side`): the
  render through the call turn past the render before it with the generation prompt, up to end-of-turn."""
  fix = ("pass --chat_template with the template the model was trained with: chatml_tools (Qwen2.5's tool "
         "form), chatml_bundled_tools (the bundled chats' form, which the tiny models learnt) or a Jinja string")
  if side.template is None:
    raise ValueError(f"the tokenizer has no chat template; {fix}")
  try:
    before = side.render_text(PROBE_MESSAGES[:1], PROBE_TOOLS, generation_prompt=True)
    through = side.render_text(PROBE_MESSAGES, PROBE_TOOLS)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"the chat template cannot render a tool call ({type(e).__name__}: {e}); {fix}") from None
  if not through.startswith(before) or PROBE_CALL.name not in through[len(before):]:
    raise ValueError(f"the chat template does not render tool calls after its generation prompt; {fix}")
  turn = through[len(before):]
  ends = [at for t in side.end_of_turn if (at := turn.find(t)) >= 0]
  return turn[:min(ends)].strip() if ends else turn.strip()


def prompt_ids(side, asked: list[Turn]) -> list[list[int] | None]:
  """The token ids each turn's model reads under `side`'s template (the conversation before the turn, with its
  tools and the generation prompt), rendered and tokenized as training does; None for a turn whose
  conversation the template refuses (Llama 3.1's: two calls in one turn)."""
  out = []
  for turn in asked:
    try:
      text = side.render_text(turn.messages, turn.tools, generation_prompt=True)
    except Exception:  # pylint: disable=broad-except
      out.append(None)
      continue
    out.append(side.backend.encode(text, add_special_tokens=False).ids)
  return out


def syntax_of(side) -> str:
  """The syntax (a key of SYNTAXES) that reads back exactly the call `side`'s chat template writes."""
  turn = rendered_call(side)
  for syntax in SYNTAXES:
    if parse(turn, syntax) == Said((PROBE_CALL,)):
      return syntax
  raise ValueError(f"the chat template writes a call as {turn[:200]!r}, which none of the known syntaxes "
                   f"({', '.join(SYNTAXES)}) reads: --task function_calling cannot score this model's calls")


# ---------------------------------------------------------------------------------------------------------
# The check (BFCL's AST checker, for JSON-schema tools)
# ---------------------------------------------------------------------------------------------------------

# Type names of JSON schemas and of BFCL's Python-flavoured ones, as JSON kinds.
_TYPES = {"string": "string", "str": "string", "any": None, "integer": "integer", "int": "integer",
          "number": "number", "float": "number", "boolean": "boolean", "bool": "boolean", "array": "array",
          "list": "array", "tuple": "array", "object": "object", "dict": "object", "null": "null"}


def standardize_string(text: str) -> str:
  """BFCL's string normalisation: no spaces or , . / - _ * ^, lower case, single quotes as double (so
  "April 1, 2024" and "april 1 2024" are one answer; so are "12 * 34" and "1234")."""
  return re.sub(r"[ ,./\-_*^]", "", text).lower().replace("'", '"')


def _kind(value: Any) -> str | None:
  """The JSON kind of a decoded value (a bool is not an integer)."""
  if value is None:
    return "null"
  for kind, types in (("boolean", bool), ("integer", int), ("number", float), ("string", str),
                      ("array", list), ("object", dict)):
    if isinstance(value, types):
      return kind
  return None


def _declared(spec: Mapping) -> list[str]:
  types = spec.get("type") if isinstance(spec, Mapping) else None
  types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
  return [k for t in types if isinstance(t, str) and (k := _TYPES.get(t.lower()))]


def _type_error(value: Any, spec: Mapping) -> bool:
  """Whether `value`, or an item or member of it, has a type its schema does not allow."""
  kind, declared = _kind(value), _declared(spec)
  if declared and kind not in declared and not (kind == "integer" and "number" in declared):
    return True
  if kind == "array" and isinstance(spec.get("items"), Mapping):
    return any(_type_error(v, spec["items"]) for v in value)
  if kind == "object" and isinstance(spec.get("properties"), Mapping):
    return any(_type_error(v, spec["properties"].get(k, {})) for k, v in value.items())
  return False


def _normal(value: Any) -> Any:
  """A value in the form in which equal answers are equal: strings standardised, bools tagged (Python's True
  equals 1; an integer equals its float, as it should where the type check let it through), lists and objects
  member-wise."""
  kind = _kind(value)
  if kind == "string":
    return standardize_string(value)
  if kind == "boolean":
    return ("bool", value)
  if kind == "array":
    return [_normal(v) for v in value]
  if kind == "object":
    return {k: _normal(v) for k, v in value.items()}
  return value


def _value_error(value: Any, expected: Any, spec: Mapping) -> str | None:
  if _type_error(value, spec) or (not _declared(spec) and _kind(expected) not in (None, "null") and
                                   _kind(value) != _kind(expected) and
                                   {_kind(value), _kind(expected)} != {"integer", "number"}):
    return "wrong_type"  # without a declared type, the expected value's kind is the type
  return None if _normal(value) == _normal(expected) else "wrong_value"


def check_call(said: Call, expected: Call, schema: Mapping) -> str | None:
  """None when `said` is right for `expected`, a call of the function whose parameters' JSON schema is
  `schema`; else why not (one of ERRORS)."""
  if said.name != expected.name:
    return "wrong_name"
  properties = schema.get("properties")
  properties = properties if isinstance(properties, Mapping) else None
  if any(r not in said.arguments for r in schema.get("required") or ()):
    return "missing_required"
  known = properties if properties is not None else expected.arguments
  if any(k not in known for k in said.arguments):
    return "unknown_argument"
  specs = properties or {}
  for k, value in said.arguments.items():
    spec = specs.get(k) if isinstance(specs.get(k), Mapping) else {}
    if k in expected.arguments:
      problem = _value_error(value, expected.arguments[k], spec)
      if problem:
        return problem
    elif "default" not in spec or _value_error(value, spec["default"], spec):
      return "unexpected_argument"  # the expected call leaves it to its default: only that value is right
  for k, value in expected.arguments.items():
    spec = specs.get(k) if isinstance(specs.get(k), Mapping) else {}
    if k not in said.arguments and "default" in spec and _value_error(spec["default"], value, spec):
      return "missing_optional"  # left out, it takes the default, which is not the expected value
  return None


def _perfect_matching(ok: list[list[bool]]) -> bool:
  """Whether every row i gets its own column j with ok[i][j] (Kuhn's augmenting paths; square `ok`)."""
  owner: list[int | None] = [None] * len(ok)

  def take(i: int, seen: set) -> bool:
    for j, fits in enumerate(ok[i]):
      if fits and j not in seen:
        seen.add(j)
        if owner[j] is None or take(owner[j], seen):
          owner[j] = i
          return True
    return False

  return all(take(i, set()) for i in range(len(ok)))


def check(turn: Turn, said: Said) -> str | None:
  """None when the reply's calls are right for the turn, else why not (one of ERRORS)."""
  if said.malformed:
    return "malformed"
  if not turn.expected:
    return "unexpected_call" if said.calls else None
  if not said.calls:
    return "no_call"
  if len(said.calls) != len(turn.expected):
    return "wrong_count"
  schemas = parameters(turn.tools)
  if len(turn.expected) == 1:
    return check_call(said.calls[0], turn.expected[0], schemas[turn.expected[0].name])
  ok = [[check_call(s, e, schemas[e.name]) is None for s in said.calls] for e in turn.expected]
  return None if _perfect_matching(ok) else "no_match"


def score(asked: list[Turn], verdicts: list[str | None], skipped: collections.Counter | None = None) -> dict:
  """{"accuracy", "correct", "total", "calls": {...}, "categories": {name: {accuracy, correct, total}},
  "errors": {reason: turns}, "skipped": {reason: turns}} from each turn's `check` verdict; "calls" tallies the
  turns that expect calls (every category but no_call, which a model that never calls gets right)."""
  if len(asked) != len(verdicts):
    raise ValueError(f"{len(asked)} turns but {len(verdicts)} verdicts")

  def tally(rows):
    right = sum(v is None for v in rows)
    return {"accuracy": right / len(rows) if rows else float("nan"), "correct": right, "total": len(rows)}

  categories = {c: tally([v for t, v in zip(asked, verdicts) if t.category == c]) for c in CATEGORIES}
  errors = collections.Counter(v for v in verdicts if v is not None)
  return {**tally(verdicts), "calls": tally([v for t, v in zip(asked, verdicts) if t.expected]),
          "categories": {c: v for c, v in categories.items() if v["total"]},
          "errors": {e: errors[e] for e in ERRORS if errors[e]}, "skipped": dict(skipped or {})}


def report(asked: list[Turn], replies: list[str], syntax: str, skipped: collections.Counter | None = None) -> dict:
  """`score` of the replies to the turns, read in `syntax`, with "syntax" and "turns": each turn's category,
  the last message before it, the expected and produced calls, the reply and the verdict ("right" or one of
  ERRORS)."""
  said = [parse(r, syntax) for r in replies]
  verdicts = [check(t, s) for t, s in zip(asked, said)]
  out = score(asked, verdicts, +(skipped or collections.Counter()))
  as_json = lambda calls: [{"name": c.name, "arguments": c.arguments} for c in calls]
  out["syntax"] = syntax
  out["turns"] = [{"category": t.category, "prompt": t.messages[-1].get("content", ""),
                   "expected": as_json(t.expected), "reply": r, "calls": as_json(s.calls), "verdict": v or "right"}
                  for t, r, s, v in zip(asked, replies, said, verdicts)]
  return out
