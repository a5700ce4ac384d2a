"""Format detection and conversion (jaxkd.data.formats): every format, the TFDS/JSON spellings, bad rows.

Expected conversions are written out by hand from the format definitions, not produced by the code.
"""

import json

import numpy as np
import pytest

from jaxkd.data.formats import BadRow, Conversation, DataError, Text, detect_format, to_example

U, A, S, T = "user", "assistant", "system", "tool"


@pytest.mark.parametrize("columns, fmt", [
    (["conversations", "id"], "sharegpt"),
    (["messages", "tools"], "messages"),
    (["instruction", "input", "output"], "alpaca"),
    (["prompt", "completion"], "prompt_completion"),
    (["text", "url"], "text"),
    (["id", "query", "answers", "tools"], "xlam"),
    (["system", "chat"], "glaive"),
])
def test_detect_format(columns, fmt):
  assert detect_format(columns) == fmt


def test_detect_format_unknown_names_the_fix():
  with pytest.raises(DataError, match="format=.*columns="):
    detect_format(["question", "answer"])


def msgs(*pairs):
  return [{"role": r, "content": c} for r, c in pairs]


def test_sharegpt_all_roles():
  row = {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                           {"from": "gpt", "value": "call"}, {"from": "tool", "value": "42"},
                           {"from": "gpt", "value": "it is 42"}]}
  ex = to_example(row, "sharegpt")
  assert ex == Conversation(msgs((S, "be brief"), (U, "hi"), (A, "call"), (T, "42"), (A, "it is 42")))


def test_messages_with_tools_and_content_parts():
  row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                      {"role": "assistant", "content": "c"}],
         "tools": '[{"name": "f"}]'}
  ex = to_example(row, "messages")
  assert ex == Conversation(msgs((U, "ab"), (A, "c")), tools=[{"name": "f"}])


def test_alpaca_with_and_without_input():
  ex = to_example({"instruction": "Sum", "input": "1 2", "output": "3"}, "alpaca")
  assert ex == Conversation(msgs((U, "Sum\n\n1 2"), (A, "3")))
  ex = to_example({"instruction": "Say hi", "input": "", "output": "hi"}, "alpaca")
  assert ex == Conversation(msgs((U, "Say hi"), (A, "hi")))


def test_prompt_completion_chat_raw_and_conversational():
  row = {"prompt": "Q: 1+1? ", "completion": "2"}
  assert to_example(row, "prompt_completion") == Conversation(msgs((U, "Q: 1+1? "), (A, "2")))
  assert to_example(row, "prompt_completion", chat_prompt_completion=False) == Text("Q: 1+1? 2", train_from=8)
  row = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
         "completion": [{"role": "assistant", "content": "a"}]}
  assert to_example(row, "prompt_completion") == Conversation(msgs((S, "s"), (U, "u"), (A, "a")))


def test_text():
  assert to_example({"text": "hello world"}, "text") == Text("hello world")


def test_tfds_columnar_bytes_and_json_strings():
  # tfds.data_source decodes Sequence({from, value}) as {from: [bytes], value: [bytes]}.
  row = {"conversations": {"from": [b"human", b"gpt"], "value": [b"hi", "yo".encode()]}}
  assert to_example(row, "sharegpt") == Conversation(msgs((U, "hi"), (A, "yo")))
  row = {"messages": '[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]'}
  assert to_example(row, "messages") == Conversation(msgs((U, "x"), (A, "y")))


def test_role_aliases_extendable():
  row = {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}
  with pytest.raises(BadRow) as e:
    to_example(row, "sharegpt")
  assert e.value.reason == "unknown_role" and "'bot'" in e.value.detail
  from jaxkd.data.formats import ROLE_ALIASES
  ex = to_example(row, "sharegpt", role_aliases={**ROLE_ALIASES, "bot": "assistant"})
  assert ex.messages[1]["role"] == A


@pytest.mark.parametrize("row, fmt, reason", [
    ({"id": 1}, "sharegpt", "missing_field"),
    ({"conversations": None}, "sharegpt", "missing_field"),
    ({"conversations": []}, "sharegpt", "empty_conversation"),
    ({"conversations": {"from": np.array([], object), "value": np.array([], object)}}, "sharegpt",
     "empty_conversation"),  # an empty TFDS sequence
    ({"conversations": [{"from": "human"}]}, "sharegpt", "missing_field"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "sharegpt", "unknown_role"),
    ({"conversations": [{"from": "human", "value": 3}]}, "sharegpt", "non_string_content"),
    ({"messages": [{"role": "user", "content": {"a": 1}}]}, "messages", "non_string_content"),
    ({"messages": "not json"}, "messages", "non_string_content"),
    ({"instruction": "x"}, "alpaca", "missing_field"),
    ({"prompt": "x", "completion": 5}, "prompt_completion", "non_string_content"),
    ({"text": "   "}, "text", "empty_text"),
    ({"text": ["a"]}, "text", "non_string_content"),
])
def test_bad_rows_have_reasons(row, fmt, reason):
  with pytest.raises(BadRow) as e:
    to_example(row, fmt)
  assert e.value.reason == reason


def test_unknown_format_is_a_config_error():
  with pytest.raises(DataError, match="unknown data format"):
    to_example({"text": "x"}, "markdown")


# -- tool calling ---------------------------------------------------------------------------------------------

WEATHER_CALL = {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


@pytest.mark.parametrize("content", [None, "", "Let me check."])
@pytest.mark.parametrize("arguments", ['{"city": "Paris"}', {"city": "Paris"}])
def test_call_turns_keep_their_calls_whatever_the_content(content, arguments):
  call = {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
  row = {"messages": [
      {"role": "user", "content": "Weather in Paris?", "tool_calls": None, "name": None},
      {"role": "assistant", "content": content, "tool_calls": [call]},
      {"role": "tool", "tool_call_id": "call_0", "name": "get_weather", "content": "sunny"},
      {"role": "assistant", "content": "Sunny.", "tool_call_id": None}],
      "tools": [{"type": "function", "function": {"name": "get_weather"}}]}
  calling = {"role": A, "tool_calls": [WEATHER_CALL]}
  if content is not None:  # a null content is left out, as apply_chat_template leaves out None values
    calling = {"role": A, "content": content, "tool_calls": [WEATHER_CALL]}
  assert to_example(row, "messages") == Conversation([
      {"role": U, "content": "Weather in Paris?"}, calling,
      {"role": T, "content": "sunny", "tool_call_id": "call_0", "name": "get_weather"},
      {"role": A, "content": "Sunny."}], tools=[{"type": "function", "function": {"name": "get_weather"}}])


@pytest.mark.parametrize("arguments", [
    {"symbols": ["AAPL", "MSFT"]}, {"ids": []}, {"a": [1, 2], "b": [3, 4]}, {"q": {"x": [1], "y": [2]}}])
def test_call_arguments_are_never_reshaped(arguments):
  # Equal-length lists look like a TFDS columnar sequence; inside arguments they are just values.
  for given in (arguments, json.dumps(arguments), {k: np.asarray(v) if isinstance(v, list) else v
                                                   for k, v in arguments.items()}):
    row = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": given}}]}]}
    assert to_example(row, "messages").messages[1]["tool_calls"][0]["function"]["arguments"] == arguments


def test_tools_column_forms():
  chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
  schema = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
  for tools, expected in (([], []), ("[]", []), (None, None), ("", None), ([schema], [schema]),
                          (json.dumps([schema]), [schema]), (schema, [schema])):
    assert to_example({"messages": chat, "tools": tools}, "messages").tools == expected, tools


def test_flat_and_legacy_calls_become_openai_calls():
  flat = {"messages": [{"role": "user", "content": "q"},
                       {"role": "assistant", "tool_calls": [{"name": "f", "arguments": '{"x": 1}'}]}]}
  legacy = {"messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": '{"x": 1}'}},
                         {"role": "function", "name": "f", "content": "2"}]}
  expected = [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]
  assert to_example(flat, "messages").messages[1] == {"role": A, "tool_calls": expected}
  ex = to_example(legacy, "messages")
  assert ex.messages[1:] == [{"role": A, "tool_calls": expected}, {"role": T, "content": "2", "name": "f"}]
  # No arguments at all is an empty object (vLLM's reading); an empty tool_calls list is no call.
  none = {"messages": [{"role": "user", "content": "q"},
                       {"role": "assistant", "content": "a", "tool_calls": []},
                       {"role": "assistant", "tool_calls": [{"function": {"name": "g", "arguments": ""}}]}]}
  assert to_example(none, "messages").messages[1:] == [
      {"role": A, "content": "a"}, {"role": A, "tool_calls": [{"function": {"name": "g", "arguments": {}}}]}]


@pytest.mark.parametrize("message, reason", [
    ({"role": "assistant", "content": None}, "missing_field"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x: 1"}}]}, "bad_tool_call"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1, 2]"}}]}, "bad_tool_call"),
    ({"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}, "bad_tool_call"),
    ({"role": "assistant", "tool_calls": {"name": "f"}}, "bad_tool_call"),
    ({"role": "user", "content": "q", "tool_calls": [{"function": {"name": "f"}}]}, "bad_tool_call"),
    ({"role": "tool", "content": "r", "tool_call_id": 7}, "non_string_content"),
])
def test_bad_tool_calls_are_bad_rows(message, reason):
  with pytest.raises(BadRow) as e:
    to_example({"messages": [{"role": "user", "content": "q"}, message]}, "messages")
  assert e.value.reason == reason


def test_xlam_rows_become_calls_and_json_schemas():
  row = {"id": 4, "query": "Giveaways of type beta, and the 5 largest of [3, 9, 1]?",
         "tools": json.dumps([
             {"name": "live_giveaways_by_type", "description": "Live giveaways by type.",
              "parameters": {"type": {"description": "game, loot or beta.", "type": "str", "default": "game"}}},
             {"name": "n_largest", "description": "The n largest numbers.",
              "parameters": {"nums": {"description": "The numbers.", "type": "List[int]"},
                             "n": {"description": "How many.", "type": "int"},
                             "order": {"description": "Sort order.", "type": "str, optional"},
                             "extra": {"description": "Anything.", "type": "Dict[str, Any], optional"}}}]),
         "answers": json.dumps([{"name": "live_giveaways_by_type", "arguments": {"type": "beta"}},
                                {"name": "n_largest", "arguments": {"nums": [3, 9, 1], "n": 5}}])}
  assert to_example(row, "xlam") == Conversation(
      [{"role": U, "content": "Giveaways of type beta, and the 5 largest of [3, 9, 1]?"},
       {"role": A, "tool_calls": [
           {"type": "function", "function": {"name": "live_giveaways_by_type", "arguments": {"type": "beta"}}},
           {"type": "function", "function": {"name": "n_largest", "arguments": {"nums": [3, 9, 1], "n": 5}}}]}],
      tools=[{"type": "function", "function": {
                  "name": "live_giveaways_by_type", "description": "Live giveaways by type.",
                  "parameters": {"type": "object", "properties": {
                      "type": {"type": "string", "description": "game, loot or beta.", "default": "game"}},
                                 "required": []}}},
             {"type": "function", "function": {
                 "name": "n_largest", "description": "The n largest numbers.",
                 "parameters": {"type": "object", "properties": {
                     "nums": {"type": "array", "items": {"type": "integer"}, "description": "The numbers."},
                     "n": {"type": "integer", "description": "How many."},
                     "order": {"type": "string", "description": "Sort order."},
                     "extra": {"type": "object", "description": "Anything."}},
                                "required": ["nums", "n"]}}}])
  with pytest.raises(BadRow) as e:
    to_example({**row, "answers": "[]"}, "xlam")
  assert e.value.reason == "missing_field"


GLAIVE_SYSTEM = (
    "SYSTEM: You are a helpful assistant with access to the following functions. Use them if required -\n"
    '{\n    "name": "get_exchange_rate",\n    "description": "Get the exchange rate",\n    "parameters": {\n'
    '        "type": "object",\n        "properties": {\n            "base": {\n                "type": "string"\n'
    '            }\n        },\n        "required": [\n            "base"\n        ]\n    }\n}\n\n'
    '{\n    "name": "ping",\n    "parameters": {}\n}\n')
GLAIVE_CHAT = (
    "USER: Hi, what is the USD rate? \n\n\n"
    "ASSISTANT: <functioncall> {\"name\": \"get_exchange_rate\", \"arguments\": '{\"base\": \"USD\"}'} <|endoftext|>\n\n\n"
    "FUNCTION RESPONSE: {\"rate\": 0.85}\n\n\n"
    "ASSISTANT: One dollar is 0.85 euro.\nAnything else? <|endoftext|>\n\n\n"
    "USER: No, thanks.\n\n\n"
    "ASSISTANT: Goodbye! <|endoftext|>\n")


def test_glaive_rows_become_messages_and_tools():
  ex = to_example({"system": GLAIVE_SYSTEM, "chat": GLAIVE_CHAT}, "glaive")
  assert ex == Conversation(
      [{"role": S, "content": "You are a helpful assistant with access to the following functions. Use them if "
                              "required -"},
       {"role": U, "content": "Hi, what is the USD rate?"},
       {"role": A, "tool_calls": [{"type": "function", "function": {"name": "get_exchange_rate",
                                                                    "arguments": {"base": "USD"}}}]},
       {"role": T, "content": '{"rate": 0.85}', "name": "get_exchange_rate"},
       {"role": A, "content": "One dollar is 0.85 euro.\nAnything else?"},
       {"role": U, "content": "No, thanks."},
       {"role": A, "content": "Goodbye!"}],
      tools=[{"type": "function", "function": {
                  "name": "get_exchange_rate", "description": "Get the exchange rate",
                  "parameters": {"type": "object", "properties": {"base": {"type": "string"}}, "required": ["base"]}}},
             {"type": "function", "function": {"name": "ping", "parameters": {}}}])
  plain = to_example({"system": "SYSTEM: You are a helpful assistant, with no access to external functions.\n\n",
                      "chat": "USER: Hi\n\n\nASSISTANT: Hello! <|endoftext|>"}, "glaive")
  assert plain == Conversation(msgs((S, "You are a helpful assistant, with no access to external functions."),
                                    (U, "Hi"), (A, "Hello!")))
  with pytest.raises(BadRow) as e:
    to_example({"system": "", "chat": "ASSISTANT: <functioncall> {name: f} <|endoftext|>"}, "glaive")
  assert e.value.reason == "bad_tool_call"
