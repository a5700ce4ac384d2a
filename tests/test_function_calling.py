"""The function-calling check (BFCL's AST checker's documented behaviours, each right and wrong), the call
parsers against what the published Qwen2.5 and Llama 3.1 templates write, and `jaxkd.eval --task
function_calling` on the bundled trained teacher against a random student."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxkd import answers, data, eval as eval_lib
from jaxkd import function_calling as fc
from jaxkd.config_base import base_config, tiny_defaults
from jaxkd.data import synthetic
from jaxkd.data.encode import Side, resolve_template
from jaxkd.data.formats import to_example
from jaxkd.data.sources import eval_rows
from tests.data_references import LLAMA31_TEMPLATE, QWEN25_TEMPLATE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"type": "string", "default": "celsius"}, "days": {"type": "integer"},
    "lat": {"type": "number"}, "daily": {"type": "boolean"}, "hours": {"type": "array", "items": {"type": "integer"}},
    "tags": {"type": "array", "items": {"type": "string"}}, "marks": {"type": "array"},
    "where": {"type": "object", "properties": {"street": {"type": "string"}, "floor": {"type": "integer"}}}},
    "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
SCHEMA = WEATHER["function"]["parameters"]


def weather(**arguments):
  return fc.Call("get_weather", arguments)


def turn(*expected, tools=(WEATHER,)):
  category = ("no_call" if not expected else "parallel" if len(expected) > 1
              else "simple" if len(tools) == 1 else "multiple")
  return fc.Turn([{"role": "user", "content": "?"}], list(tools), tuple(expected), category)


# (produced, expected, verdict): None is right, else the reason BFCL gives (in jaxkd's names).
CALL_CASES = [
    (weather(city="Paris"), weather(city="Paris"), None),
    (fc.Call("get_time", {"city": "Paris"}), weather(city="Paris"), "wrong_name"),
    (fc.Call("Get_Weather", {"city": "Paris"}), weather(city="Paris"), "wrong_name"),  # names are exact
    (weather(days=3), weather(city="Paris", days=3), "missing_required"),
    (weather(city="Paris", country="FR"), weather(city="Paris"), "unknown_argument"),
    # Type normalisation: an integer is a number, a float is not an integer, a bool is neither.
    (weather(city="Paris", lat=48), weather(city="Paris", lat=48.0), None),
    (weather(city="Paris", lat=48.0), weather(city="Paris", lat=48), None),
    (weather(city="Paris", lat=48.5), weather(city="Paris", lat=48), "wrong_value"),
    (weather(city="Paris", days=3.0), weather(city="Paris", days=3), "wrong_type"),
    (weather(city="Paris", days=True), weather(city="Paris", days=1), "wrong_type"),
    (weather(city="Paris", days="3"), weather(city="Paris", days=3), "wrong_type"),
    (weather(city="Paris", daily=1), weather(city="Paris", daily=True), "wrong_type"),
    (weather(city=3), weather(city="3"), "wrong_type"),
    # Strings as BFCL's standardize_string: case, spaces and , . / - _ * ^ do not count; other letters do.
    (weather(city="new york"), weather(city="New York"), None),
    (weather(city="NewYork"), weather(city="New York"), None),
    (weather(city="New-York."), weather(city="New York"), None),
    (weather(city="april 1 2024"), weather(city="April 1, 2024"), None),
    (weather(city="it's"), weather(city='it"s'), None),  # single quotes read as double
    (weather(city="Newark"), weather(city="New York"), "wrong_value"),
    (weather(city="New York!"), weather(city="New York"), "wrong_value"),
    # Lists keep their order, their strings standardised, their numbers normalised; objects member-wise.
    (weather(city="Paris", tags=["Rain", "wind"]), weather(city="Paris", tags=["rain", "Wind"]), None),
    (weather(city="Paris", tags=["wind", "rain"]), weather(city="Paris", tags=["rain", "wind"]), "wrong_value"),
    (weather(city="Paris", hours=[1, 2]), weather(city="Paris", hours=[1, 2]), None),
    (weather(city="Paris", hours=[1, 2.5]), weather(city="Paris", hours=[1, 2]), "wrong_type"),
    (weather(city="Paris", marks=[1, "A"]), weather(city="Paris", marks=[1.0, "a"]), None),  # items untyped
    (weather(city="Paris", marks=[1]), weather(city="Paris", marks=[True]), "wrong_value"),  # True is not 1
    (weather(city="Paris", where={"street": "rue de rivoli", "floor": 2}),
     weather(city="Paris", where={"street": "Rue de Rivoli", "floor": 2}), None),
    (weather(city="Paris", where={"street": "Rue de Rivoli"}),
     weather(city="Paris", where={"street": "Rue de Rivoli", "floor": 2}), "wrong_value"),
    # Optional arguments: absent, or the expected value; one the expected call leaves out only at its default.
    (weather(city="Paris"), weather(city="Paris", days=3), None),  # optional, no default: may be left out
    (weather(city="Paris"), weather(city="Paris", unit="celsius"), None),  # left out, it is the default
    (weather(city="Paris"), weather(city="Paris", unit="fahrenheit"), "missing_optional"),
    (weather(city="Paris", unit="Celsius"), weather(city="Paris"), None),  # the default, given
    (weather(city="Paris", unit="kelvin"), weather(city="Paris"), "unexpected_argument"),
    (weather(city="Paris", days=3), weather(city="Paris"), "unexpected_argument"),
    (weather(city="Paris", unit="kelvin"), weather(city="Paris", unit="fahrenheit"), "wrong_value"),
]


@pytest.mark.parametrize("said, expected, verdict", CALL_CASES)
def test_check_call_as_bfcl(said, expected, verdict):
  assert fc.check_call(said, expected, SCHEMA) == verdict
  # The same through a whole turn, with one tool (simple) or two (multiple).
  for tools in ((WEATHER,), (WEATHER, TIME)):
    assert fc.check(turn(expected, tools=tools), fc.Said((said,))) == verdict


def test_standardize_string_is_bfcls():
  assert {fc.standardize_string(s) for s in ("April 1, 2024", "April 1,2024", "april 1 2024")} == {"april12024"}
  assert fc.standardize_string("A_b-c/d.e*f^g 'h'") == 'abcdefg"h"'
  assert fc.standardize_string("12 * 34") == fc.standardize_string("1234")  # BFCL's rule, quirks included


def test_turn_checks_parallel_order_free_and_no_call():
  paris, lima = weather(city="Paris"), weather(city="Lima")
  both = turn(paris, lima)
  assert both.category == "parallel"
  assert fc.check(both, fc.Said((lima, paris))) is None  # any order
  assert fc.check(both, fc.Said((paris, lima))) is None
  assert fc.check(both, fc.Said((paris, paris))) == "no_match"  # one produced call cannot answer two
  assert fc.check(both, fc.Said((paris,))) == "wrong_count"
  assert fc.check(both, fc.Said((paris, lima, lima))) == "wrong_count"
  assert fc.check(both, fc.Said()) == "no_call"
  # A matching exists that the greedy first-fit of BFCL misses: e1 takes either call, e2 only the second.
  e1, e2 = weather(city="Paris", days=3), weather(city="Paris")
  s1, s2 = weather(city="Paris"), weather(city="Paris", days=3)
  assert [fc.check_call(s, e1, SCHEMA) is None for s in (s1, s2)] == [True, True]
  assert [fc.check_call(s, e2, SCHEMA) is None for s in (s1, s2)] == [True, False]
  assert fc.check(turn(e1, e2), fc.Said((s1, s2))) is None
  assert fc.check(turn(e1, e2), fc.Said((s2, s2))) == "no_match"
  # No call expected: right only without one; a botched call is wrong anywhere.
  words = turn(tools=(WEATHER, TIME))
  assert words.category == "no_call"
  assert fc.check(words, fc.Said()) is None
  assert fc.check(words, fc.Said((paris,))) == "unexpected_call"
  assert fc.check(words, fc.Said(malformed=("not JSON",))) == "malformed"
  assert fc.check(turn(paris), fc.Said((paris,), ("not JSON",))) == "malformed"


def test_score_tallies_categories_calls_and_reasons():
  asked = [turn(weather(city="A")), turn(weather(city="A"), tools=(WEATHER, TIME)), turn(weather(city="A")),
           turn(tools=(WEATHER,)), turn(weather(city="A"), weather(city="B"))]
  out = fc.score(asked, [None, "wrong_value", None, None, "no_match"])
  assert (out["correct"], out["total"]) == (3, 5)
  assert out["calls"] == {"accuracy": 0.5, "correct": 2, "total": 4}
  assert {c: (v["correct"], v["total"]) for c, v in out["categories"].items()} == {
      "simple": (2, 2), "multiple": (0, 1), "parallel": (0, 1), "no_call": (1, 1)}
  assert out["errors"] == {"wrong_value": 1, "no_match": 1}


# ---------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------


def test_hermes_calls_with_text_argument_strings_and_malformed_blocks():
  paris = weather(city="Paris")
  reply = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Lima\\"}"}\n</tool_call>')
  assert fc.parse(reply, "hermes") == fc.Said((paris, weather(city="Lima")))
  assert fc.parse("It is sunny.", "hermes") == fc.Said()
  for bad in ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"</tool_call>',  # bad JSON
              '<tool_call>{"arguments": {"city": "Paris"}}</tool_call>',  # no name
              '<tool_call>{"name": "get_weather", "city": "Paris"}</tool_call>',  # no "arguments"
              '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>',
              '<tool_call>{"name": "get_weather", "arguments": "not json"}</tool_call>',
              '<tool_call>["get_weather"]</tool_call>',
              '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'):  # cut off: unclosed
    said = fc.parse(bad, "hermes")
    assert said.malformed and not said.calls, bad
    assert fc.check(turn(paris), said) == "malformed"
  # A good call beside a broken one still makes the turn wrong.
  said = fc.parse('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><tool_call>{',
                  "hermes")
  assert said.calls == (paris,) and fc.check(turn(paris), said) == "malformed"


def test_llama3_json_calls_with_and_without_python_tag():
  paris = weather(city="Paris")
  for reply in ('{"name": "get_weather", "parameters": {"city": "Paris"}}',
                '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
                ' {"name": "get_weather", "arguments": {"city": "Paris"}} '):
    assert fc.parse(reply, "llama3_json") == fc.Said((paris,)), reply
  two = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {"zone": "UTC"}}'
  assert fc.parse(two, "llama3_json").calls == (paris, fc.Call("get_time", {"zone": "UTC"}))
  assert fc.parse("Paris is sunny today.", "llama3_json") == fc.Said()
  for bad in ('{"name": "get_weather", "parameters": {"city": "Paris"}', '{"name": "get_weather"}',
              '{"name": "get_weather", "parameters": {"city": "Paris"}} and more', '<|python_tag|>weather("Paris")',
              '{"parameters": {"city": "Paris"}}'):
    said = fc.parse(bad, "llama3_json")
    assert said.malformed and not said.calls, bad


def test_inline_calls_are_the_bundled_chats_form():
  said = fc.parse('<tool_call>{"name": "calculator", "expression": "12 * 34"}</tool_call>', "inline")
  assert said == fc.Said((fc.Call("calculator", {"expression": "12 * 34"}),))
  assert fc.parse('<tool_call>{"name": "calculator", "expression": "12 * 34"</tool_call>', "inline").malformed


@pytest.fixture(scope="module")
def llama_tok():
  """The bundled tokenizer with Llama 3's header and turn tokens as special tokens."""
  t = data.load_tokenizer(data.TOKENIZER_DIR)
  t.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": [
      "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]})
  return t


def _written(side, messages, tools, k):
  """What the model writes for assistant message k under the template (as fc.rendered_call cuts it)."""
  before = side.render_text(messages[:k], tools, generation_prompt=True)
  through = side.render_text(messages[:k + 1], tools)
  assert through.startswith(before)
  turn_ = through[len(before):]
  return turn_[:min(at for t in side.end_of_turn if (at := turn_.find(t)) >= 0)]


QUOTES = [{"type": "function", "function": {"name": "get_quotes", "parameters": {"type": "object", "properties": {
    "symbols": {"type": "array", "items": {"type": "string"}}, "live": {"type": "boolean"}},
    "required": ["symbols"]}}}, WEATHER]


@pytest.mark.parametrize("family", ["qwen25", "llama31", "chatml_tools", "chatml_bundled_tools"])
def test_each_template_is_read_back_by_its_syntax(family, tok, llama_tok):
  """The syntax found for a template reads back exactly the calls the published template writes (one call;
  two in a turn where the template allows it), and no other syntax does."""
  tokenizer, template, syntax = {"qwen25": (tok, QWEN25_TEMPLATE, "hermes"),
                                 "llama31": (llama_tok, LLAMA31_TEMPLATE, "llama3_json"),
                                 "chatml_tools": (tok, "chatml_tools", "hermes"),
                                 "chatml_bundled_tools": (tok, "chatml_bundled_tools", "inline")}[family]
  side = Side(tokenizer, resolve_template(template, tokenizer))
  assert fc.syntax_of(side) == syntax
  calls = [fc.Call("get_quotes", {"symbols": ["AAPL", "MSFT"], "live": True}),
           fc.Call("get_weather", {"city": "Zürich", "lat": 47.4, "where": {"street": "Bahnhofstrasse"}})]
  for made in ([calls[0]], [calls[1]]) if family == "llama31" else ([calls[0]], calls):
    messages = [{"role": "user", "content": "Quotes and weather, please."},
                {"role": "assistant", "tool_calls": [
                    {"type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in made]}]
    written = _written(side, messages, QUOTES, 1)
    assert fc.parse(written, syntax) == fc.Said(tuple(made)), written
    others = [s for s in fc.SYNTAXES if s != syntax and fc.parse(written, s) == fc.Said(tuple(made))]
    assert not others, (others, written)


def test_a_template_without_tool_calls_is_refused_with_the_fix(tok):
  with pytest.raises(ValueError, match="chatml_bundled_tools"):
    fc.syntax_of(Side(tok, resolve_template("chatml", tok)))


# ---------------------------------------------------------------------------------------------------------
# Turns of conversations, from the OpenAI layout, xLAM and Glaive
# ---------------------------------------------------------------------------------------------------------


def test_turns_of_openai_xlam_and_glaive_rows():
  xlam = to_example({"query": "Weather in Oslo and Lima?", "tools": json.dumps([
      {"name": "get_weather", "description": "", "parameters": {"city": {"type": "str"}}}]),
      "answers": json.dumps([{"name": "get_weather", "arguments": {"city": "Oslo"}},
                             {"name": "get_weather", "arguments": {"city": "Lima"}}])}, "xlam")
  glaive = to_example({"system": 'SYSTEM: You are helpful. {"name": "get_time", "parameters": {"type": "object", '
                                 '"properties": {"zone": {"type": "string"}}, "required": ["zone"]}}',
                       "chat": 'USER: Time in UTC?\n\nASSISTANT: <functioncall> {"name": "get_time", "arguments": '
                               '\'{"zone": "UTC"}\'} <|endoftext|>\n\nFUNCTION RESPONSE: {"time": "12:00"}\n\n'
                               'ASSISTANT: It is noon. <|endoftext|>'}, "glaive")
  openai = to_example(json.loads(open(data.CHAT_TOOLS_OPENAI).readline()), "messages")
  plain = to_example({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
                     "messages")
  found = fc.turns([xlam, glaive, openai, plain])
  assert [(t.category, t.expected) for t in found.turns] == [
      ("parallel", (fc.Call("get_weather", {"city": "Oslo"}), fc.Call("get_weather", {"city": "Lima"}))),
      ("simple", (fc.Call("get_time", {"zone": "UTC"}),)), ("no_call", ()),
      ("multiple", (fc.Call("calculator", {"expression": "518 * 54"}),)), ("no_call", ())]
  assert found.skipped == {"no_tools": 1}
  assert found.turns[3].messages == openai.messages[:2] and found.turns[4].messages == openai.messages[:4]
  assert len(fc.turns([xlam, glaive, openai], limit=3).turns) == 3


def _held_out_tool_rows():
  """The rows of chat_tools_openai.jsonl whose chats the tiny configs hold out (those rows of the bundled
  chats call tools; the file holds the chats that call tools, in order)."""
  cfg = tiny_defaults(base_config()).data
  chats = synthetic.make_conversations(synthetic.DEFAULT_SEED, synthetic.NUM_CONVERSATIONS)
  held = set(np.flatnonzero(eval_rows(np.arange(len(chats)), cfg.eval_fraction, cfg.eval_seed)).tolist())
  with open(data.CHAT_TOOLS_OPENAI) as f:
    rows = [json.loads(line) for line in f]
  positions = [i for i, c in enumerate(chats) if synthetic.calls_tools(c)]
  assert len(positions) == len(rows)
  return [row for row, i in zip(rows, positions) if i in held]


def test_bundled_held_out_tool_chats_are_the_openai_files_held_out_rows():
  rows = _held_out_tool_rows()
  cfg = tiny_defaults(base_config()).data
  found = [c for c in map(fc.from_bundled, data.held_out_conversations(cfg)) if c is not None]
  assert len(found) == len(rows) >= 10
  assert [(c.messages, c.tools) for c in found] == [
      (e.messages, e.tools) for e in (to_example(r, "messages") for r in rows)]


def test_teacher_calls_right_where_a_random_student_never_calls(tmp_path):
  """--task function_calling on the held-out tool chats under chatml_bundled_tools (the form the tiny models
  learnt; under chatml_tools, Qwen2.5's form, the teacher writes no call at all). Measured at --limit 16: the
  teacher gets 5 of 8 calls right (its misses are wrong digits in the expression) and answers the 8 turns
  after a tool result without a call; the random student writes no call (0 of 8, and 8 of 8 no_call turns)."""
  held = tmp_path / "held_out_tools.jsonl"
  held.write_text("".join(json.dumps(r) + "\n" for r in _held_out_tool_rows()))
  out_path = tmp_path / "teacher.json"
  run = subprocess.run([sys.executable, "-m", "jaxkd.eval", "--task", "function_calling", "--model",
                        "tiny:teacher-trained", "--data", str(held), "--chat_template", "chatml_bundled_tools",
                        "--limit", "16", "--max_new_tokens", "40", "--output", str(out_path)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert run.returncode == 0, run.stderr[-2000:]
  teacher = json.loads(out_path.read_text())
  assert "calls right" in run.stdout and "inline call syntax" in run.stdout
  assert teacher["total"] == 16 and teacher["syntax"] == "inline"
  assert {c: v["total"] for c, v in teacher["categories"].items()} == {"multiple": 8, "no_call": 8}
  assert teacher["calls"]["correct"] >= 3, teacher["calls"]
  # Independently: jaxkd.answers' check of the text-form call (its tool, its argument, spaces aside) agrees on
  # every call turn.
  for t in teacher["turns"]:
    if t["expected"]:
      (call,) = t["expected"]
      ((argument, value),) = call["arguments"].items()
      assert (t["verdict"] == "right") == answers.ToolCall(call["name"], argument, value)(t["reply"]), t

  student = eval_lib.function_calling_accuracy("tiny:student", chat_template="chatml_bundled_tools", limit=16,
                                               max_new_tokens=40)
  assert student["calls"] == {"accuracy": 0.0, "correct": 0, "total": 8}, student["calls"]
  assert student["categories"]["no_call"]["total"] == 8
