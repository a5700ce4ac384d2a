"""Questions in the bundled chats whose answers can be checked, and the check of a generated reply.

    found = answers.questions(messages)    # one Question per assistant turn that has a checkable answer
    found.questions[0].check("3 + 4 = 7.")  # True
    answers.score(found.questions, replies) # accuracy overall and per category

A conversation from `jaxkd.data.synthetic`'s grammar is walked turn by turn; each assistant turn becomes a
prompt (the conversation up to it, earlier turns as the data has them) with a check derived from the
*question* alone, never from the data's own reply:
  arithmetic   "What is 3 + 4?": the reply's last integer is the result
  followup     "And plus 2?": the last integer is the previous turn's result with the step applied
  synonym      "Give me a word that means big." / "two words": that many distinct listed synonyms of the word,
               and no synonym of another word
  listing      "Name 3 fruits.": exactly k distinct members of the category, and no member of another one
  tool_call    (under the tool system prompt) one <tool_call>{json}</tool_call> with the right tool and argument
  tool_answer  the reply after the tool result: the product (calculator), or the city's temperature and sky
Stories have no single right answer and are not scored; user turns outside the grammar are skipped and
counted, never guessed. The facts (numbers' operators, synonym lists, categories, cities, skies) are
synthetic.py's own constants; only the question phrasings are matched here, and a test checks every bundled
conversation parses.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from typing import Callable

from jaxkd.data.synthetic import ANIMALS, CATEGORIES, CITIES, FOLLOW_UP_VERBS, OPS, SKIES, SYNONYMS, TOOL_SYSTEM

SCORED = ("arithmetic", "followup", "synonym", "listing", "tool_call", "tool_answer")
STORY = "story"  # asked for, but with no single right answer: counted, never scored
UNPARSED = "unparsed"  # a user turn (or a turn order) outside the grammar
CALCULATOR = ("calculator", "expression")  # (tool name, its argument) as TOOL_SYSTEM lists them
WEATHER = ("get_weather", "city")


# ---------------------------------------------------------------------------------------------------------
# Checks: each decides whether one reply is right
# ---------------------------------------------------------------------------------------------------------

# An integer: a minus sign counts only where no word or digit precedes it ("20-14" is 20 and 14, "= -4" is -4).
_INT = re.compile(r"(?:(?<![\w.])-)?\d+")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # "12,345" is one number


def integers(text: str) -> list[int]:
  return [int(x) for x in _INT.findall(_THOUSANDS.sub("", text))]


def words(text: str) -> list[str]:
  return re.findall(r"[a-z]+", text.lower())


@dataclasses.dataclass(frozen=True)
class LastNumber:
  """Right when the reply's last integer is `value` (every phrasing in the grammar ends with the result)."""
  value: int

  def __call__(self, reply: str) -> bool:
    found = integers(reply)
    return bool(found) and found[-1] == self.value


@dataclasses.dataclass(frozen=True)
class Members:
  """Right when the reply names exactly `count` words of `allowed`, each once, and none of `foreign` (words
  of the grammar that answer another question: another word's synonyms, another category's members). Words
  outside the grammar are not judged."""
  allowed: frozenset[str]
  foreign: frozenset[str]
  count: int

  def __call__(self, reply: str) -> bool:
    said = words(reply)
    named = [w for w in said if w in self.allowed]
    return (len(named) == self.count and len(set(named)) == self.count
            and not any(w in self.foreign for w in said))


@dataclasses.dataclass(frozen=True)
class ToolCall:
  """Right when the reply holds exactly one <tool_call>{json}</tool_call> whose JSON object names tool `name`
  and gives `argument` the value `value` (spaces aside: "123*45" is "123 * 45")."""
  name: str
  argument: str
  value: str

  def __call__(self, reply: str) -> bool:
    calls = re.findall(r"<tool_call>(.*?)</tool_call>", reply, flags=re.S)
    if len(calls) != 1:
      return False
    try:
      call = json.loads(calls[0])
    except json.JSONDecodeError:
      return False
    squash = lambda s: re.sub(r"\s+", "", str(s))
    return (isinstance(call, dict) and call.get("name") == self.name
            and squash(call.get(self.argument, "")) == squash(self.value))


@dataclasses.dataclass(frozen=True)
class Weather:
  """Right when the reply gives the tool's temperature (its only integer) and sky, and names no other city or
  sky (naming the city is not required)."""
  city: str
  temp: int
  sky: str

  def __call__(self, reply: str) -> bool:
    said = set(words(reply))
    return (set(integers(reply)) == {self.temp} and self.sky in said
            and not said & (set(SKIES) - {self.sky}) and not said & ({c.lower() for c in CITIES} - {self.city.lower()}))


# ---------------------------------------------------------------------------------------------------------
# The grammar's questions (synthetic.py's phrasings, over its constants)
# ---------------------------------------------------------------------------------------------------------


def _any(options) -> str:
  return "(" + "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True)) + ")"


_OP_OF = {**{op: op for op in OPS}, **{word: op for op, (word, _) in OPS.items()},
          **{verb: op for op, verb in FOLLOW_UP_VERBS.items()}}
_N, _SYM, _OP = r"(-?\d+)", _any(OPS), _any([*OPS, *(word for word, _ in OPS.values())])
_ARITHMETIC = [rf"What is {_N} {_OP} {_N}\?", rf"Compute {_N} {_OP} {_N}\.", rf"{_N} {_OP} {_N} = \?"]
_FOLLOW_UP = [rf"And {_OP} {_N}\?", rf"Now {_OP} {_N}\.", rf"What if I {_any(FOLLOW_UP_VERBS.values())} {_N}\?"]
_CALCULATION = [rf"What is {_N} {_SYM} {_N}\?", rf"Please compute {_N} {_SYM} {_N}\."]
_WEATHER = [rf"What's the weather in {_any(CITIES)}\?", rf"Is it warm in {_any(CITIES)}\?"]
_WORD = _any(SYNONYMS)
_SYNONYM = [(rf"Give me a word that means {_WORD}\.", 1), (rf"What is another word for {_WORD}\?", 1),
            (rf"Synonym for {_WORD}\?", 1), (rf"Give me two words that mean {_WORD}\.", 2)]
_CATEGORY = _any(CATEGORIES)
_LISTING = [rf"Name {_N} {_CATEGORY}\.", rf"List {_N} {_CATEGORY}, please\.", rf"Can you name {_N} {_CATEGORY}\?"]
_ANIMAL = _any(ANIMALS)
_STORY = [rf"Tell me a short story about a {_ANIMAL}\.", rf"Write a tiny story about a {_ANIMAL}\.",
          rf"Story about a {_ANIMAL}, please\."]


def _match(patterns, text):
  return next((m.groups() for p in patterns if (m := re.fullmatch(p, text.strip()))), None)


def _apply(a: int, op: str, b: int) -> int:
  return OPS[_OP_OF[op]][1](a, b)


@dataclasses.dataclass(frozen=True)
class Question:
  messages: list[dict]  # the conversation up to this assistant turn, earlier turns as the data has them
  reference: str  # the data's own reply (right, when the data is the grammar's)
  category: str  # one of SCORED
  check: Callable[[str], bool]  # whether a reply is right


@dataclasses.dataclass
class Found:
  questions: list[Question]
  skipped: collections.Counter  # assistant turns not scored, by reason (STORY, UNPARSED)


def questions(messages: list[dict]) -> Found:
  """The checkable assistant turns of one conversation (messages with canonical roles)."""
  tools = any(m["role"] == "system" and m["content"] == TOOL_SYSTEM for m in messages)
  found = Found([], collections.Counter())
  pending = None  # (category, check) the next assistant turn answers, or why it is not scored
  result = None  # the last arithmetic result: a follow-up continues from it, a calculator call returns it
  called = None  # the tool call just answered, whose result comes next
  for k, m in enumerate(messages):
    role, text = m["role"], m["content"]
    if role == "user":
      pending, result = _user_turn(text, tools, result)
      called = None
    elif role == "tool":
      pending, called = _tool_answer(text, called, result), None
    elif role == "assistant":
      if isinstance(pending, tuple):
        category, check = pending
        found.questions.append(Question(messages[:k], text, category, check))
        called = check if category == "tool_call" else None
      else:
        found.skipped[pending or UNPARSED] += 1
      pending = None  # an assistant turn answers once; the next needs a new question or a tool result
  return found


def _user_turn(text: str, tools: bool, result: int | None):
  """(what the next assistant turn answers, the arithmetic result a follow-up would continue from)."""
  if tools:
    if (g := _match(_CALCULATION, text)):
      a, op, b = int(g[0]), g[1], int(g[2])
      return ("tool_call", ToolCall(*CALCULATOR, f"{a} {op} {b}")), _apply(a, op, b)
    if (g := _match(_WEATHER, text)):
      return ("tool_call", ToolCall(*WEATHER, g[0])), None
    return UNPARSED, None
  if (g := _match(_ARITHMETIC, text)):
    value = _apply(int(g[0]), g[1], int(g[2]))
    return ("arithmetic", LastNumber(value)), value
  if (g := _match(_FOLLOW_UP, text)):
    if result is None:  # nothing to continue from: the previous question was not arithmetic we parsed
      return UNPARSED, None
    value = _apply(result, g[0], int(g[1]))
    return ("followup", LastNumber(value)), value
  for pattern, count in _SYNONYM:
    if (g := _match([pattern], text)):
      others = {s for w, (options, _) in SYNONYMS.items() if w != g[0] for s in options}
      return ("synonym", Members(frozenset(SYNONYMS[g[0]][0]), frozenset(others), count)), None
  if (g := _match(_LISTING, text)):
    others = {x for c, members in CATEGORIES.items() if c != g[1] for x in members} - set(CATEGORIES[g[1]])
    return ("listing", Members(frozenset(CATEGORIES[g[1]]), frozenset(others), int(g[0]))), None
  if _match(_STORY, text):
    return STORY, None
  return UNPARSED, None


def _tool_answer(text: str, called: ToolCall | None, result: int | None):
  """What the assistant turn after a tool's result answers: that result, in words."""
  if called is None:  # a tool result nobody asked for
    return UNPARSED
  if called.name == CALCULATOR[0]:
    return "tool_answer", LastNumber(result)
  try:
    facts = json.loads(text)
    return "tool_answer", Weather(called.value, int(facts["temp_c"]), str(facts["sky"]))
  except (json.JSONDecodeError, KeyError, TypeError, ValueError):
    return UNPARSED


def all_questions(conversations, *, limit: int | None = None) -> Found:
  """The questions of many conversations, in order, with their skips summed; with `limit`, the first `limit`
  questions (and the skips of the conversations read to find them)."""
  out = Found([], collections.Counter())
  for messages in conversations:
    if limit is not None and len(out.questions) >= limit:
      break
    found = questions(messages)
    out.questions += found.questions
    out.skipped += found.skipped
  out.questions = out.questions[:limit]
  return out


def score(asked: list[Question], replies: list[str], skipped: collections.Counter | None = None) -> dict:
  """Accuracy overall and per category: {"accuracy", "correct", "total", "categories": {name: {...}},
  "skipped": {reason: turns}, "note"}; stories, unparsed turns (and any other skip) are outside the score."""
  if len(asked) != len(replies):
    raise ValueError(f"{len(asked)} questions but {len(replies)} replies")
  right = [bool(q.check(r)) for q, r in zip(asked, replies)]

  def tally(flags):
    return {"accuracy": sum(flags) / len(flags) if flags else float("nan"), "correct": sum(flags),
            "total": len(flags)}

  categories = {c: tally([r for q, r in zip(asked, right) if q.category == c]) for c in SCORED}
  return {**tally(right), "categories": {c: v for c, v in categories.items() if v["total"]},
          "skipped": {STORY: 0, UNPARSED: 0, **(skipped or {})},
          "note": "stories have no single right answer: they are counted under skipped, not scored"}
