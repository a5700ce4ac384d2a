"""A seeded generator of small chat datasets where the right answer is a distribution, and a BPE trainer.

Every assistant answer is drawn from a *distribution* over valid continuations: phrasings of an arithmetic
answer, synonyms with fixed odds, random subsets and orders of a list, stories from a small stochastic
grammar, and styles set by a system prompt. The best model is therefore uncertain, and a teacher's
probabilities carry more than the one sampled label, which is what distillation needs to show an effect.
A few conversations call tools (a calculator, a weather lookup), so tool messages are exercised too: in the
text form the bundled tokenizer was trained on (Hermes-style `<tool_call>{json}</tool_call>` in the reply),
and in the OpenAI layout (`openai_tool_row`: `tool_calls`, `tool` messages with ids, a `tools` list of JSON
schemas) that a model's own chat template renders.

`scripts/make_assets.py` writes the bundled dataset and tokenizer with these; tests train other small
tokenizers with `train_tokenizer` (different sizes give different merges).
"""

from __future__ import annotations

import json
import os
import random
import re

from jaxkd.data.encode import CHATML_TEMPLATE

DEFAULT_SEED = 20240607
NUM_CONVERSATIONS = 2400
VOCAB_SIZE = 768
OTHER_VOCAB_SIZE = 512  # the second bundled tokenizer (SentencePiece-style), for cross-tokenizer KD
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ---------------------------------------------------------------------------
# The stochastic grammar
# ---------------------------------------------------------------------------

TERSE = "You are a terse assistant. Answer with as few words as possible."
FRIENDLY = "You are a friendly assistant."
TOOL_SYSTEM = ("You can call tools. To call one, answer with <tool_call>{json}</tool_call>. "
               "Tools: calculator(expression), get_weather(city).")

OPS = {"+": ("plus", lambda a, b: a + b), "-": ("minus", lambda a, b: a - b),
       "*": ("times", lambda a, b: a * b)}
FOLLOW_UP_VERBS = {"+": "add", "-": "subtract"}  # "What if I add 3?": the follow-ups' ops, as verbs
SYNONYMS = {  # word -> (synonyms, their odds): the odds are what a teacher can learn and a label cannot show
    "happy": (["glad", "joyful", "cheerful", "content"], [0.4, 0.3, 0.2, 0.1]),
    "big": (["large", "huge", "vast", "giant"], [0.5, 0.2, 0.2, 0.1]),
    "fast": (["quick", "rapid", "swift", "speedy"], [0.45, 0.25, 0.2, 0.1]),
    "small": (["little", "tiny", "minor", "slight"], [0.5, 0.3, 0.1, 0.1]),
    "smart": (["clever", "bright", "wise", "sharp"], [0.4, 0.3, 0.2, 0.1]),
    "sad": (["unhappy", "gloomy", "glum", "blue"], [0.5, 0.2, 0.2, 0.1]),
    "cold": (["chilly", "cool", "icy", "frosty"], [0.4, 0.3, 0.2, 0.1]),
    "old": (["ancient", "aged", "elderly", "worn"], [0.35, 0.35, 0.2, 0.1]),
}
CATEGORIES = {
    "fruits": ["apple", "banana", "cherry", "grape", "mango", "pear", "plum"],
    "colors": ["red", "blue", "green", "yellow", "purple", "orange", "white"],
    "animals": ["cat", "dog", "horse", "rabbit", "fox", "owl", "bear"],
    "tools": ["hammer", "saw", "drill", "wrench", "chisel", "pliers"],
}
ANIMALS = ["cat", "dog", "fox", "owl", "bear", "rabbit", "mouse", "horse"]
ADJECTIVES = ["small", "brave", "curious", "sleepy", "clever", "shy", "happy"]
PLACES = ["forest", "village", "river", "garden", "mountain", "castle"]
OPENINGS = ["Once upon a time", "Long ago", "One morning", "One day"]
GOALS = ["find a golden key", "cross the river", "make a new friend", "reach the top of the hill",
         "bake a cake", "find its way home"]
MIDDLES = ["It asked a wise old tree for help", "It tried again and again", "A kind bird showed it the way",
           "It met a friendly frog", "The wind carried it along"]
ENDINGS = ["In the end, it was very happy.", "And from then on, it was never lost again.",
           "That night, it slept well.", "Everyone cheered.", "It smiled and went home."]
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Rome", "Quito"]
SKIES = ["sunny", "cloudy", "rainy", "windy", "snowy"]


def _pick(rng: random.Random, options, weights=None):
  return rng.choices(options, weights=weights)[0]


def _arith_answer(rng, a, op, b, c, style):
  if style == "terse":
    return str(c)
  word = OPS[op][0]
  answer = _pick(rng, [f"{a} {op} {b} = {c}.", f"The answer is {c}.", f"{c}", f"It is {c}.",
                       f"{a} {word} {b} is {c}."], [0.35, 0.25, 0.15, 0.1, 0.15])
  if style == "friendly":
    answer = _pick(rng, ["Sure! ", "Of course! ", "Happy to help! "]) + answer
  return answer


def _arithmetic(rng, style):
  op = _pick(rng, list(OPS), [0.45, 0.35, 0.2])
  a, b = rng.randint(0, 20), rng.randint(0, 20 if op != "*" else 9)
  c = OPS[op][1](a, b)
  question = _pick(rng, [f"What is {a} {op} {b}?", f"What is {a} {OPS[op][0]} {b}?", f"Compute {a} {op} {b}.",
                         f"{a} {op} {b} = ?"])
  turns = [("user", question), ("assistant", _arith_answer(rng, a, op, b, c, style))]
  while rng.random() < 0.3:  # multi-turn follow-ups that depend on the previous answer
    d = rng.randint(1, 9)
    op2 = _pick(rng, ["+", "-"])
    e = OPS[op2][1](c, d)
    verb = FOLLOW_UP_VERBS[op2]
    follow = _pick(rng, [f"And {OPS[op2][0]} {d}?", f"Now {op2} {d}.", f"What if I {verb} {d}?"])
    turns += [("user", follow), ("assistant", _arith_answer(rng, c, op2, d, e, style))]
    c = e
  return turns


def _synonym(rng, style):
  word = _pick(rng, list(SYNONYMS))
  options, odds = SYNONYMS[word]
  if rng.random() < 0.7:
    question = _pick(rng, [f"Give me a word that means {word}.", f"What is another word for {word}?",
                           f"Synonym for {word}?"])
    choice = _pick(rng, options, odds)
    phrasings = [f"{choice.capitalize()}.", f"You could say \"{choice}\".", f"How about \"{choice}\"?"]
    answer = choice if style == "terse" else _pick(rng, phrasings)
  else:
    question = f"Give me two words that mean {word}."
    first = _pick(rng, options, odds)
    second = _pick(rng, [o for o in options if o != first])
    answer = f"{first}, {second}" if style == "terse" else f"{first.capitalize()} and {second}."
  if style == "friendly":
    answer = _pick(rng, ["Sure! ", "Of course! "]) + answer
  return [("user", question), ("assistant", answer)]


def _listing(rng, style):
  category = _pick(rng, list(CATEGORIES))
  k = rng.randint(2, 4)
  items = rng.sample(CATEGORIES[category], k)  # a random subset in a random order
  question = _pick(rng, [f"Name {k} {category}.", f"List {k} {category}, please.",
                         f"Can you name {k} {category}?"])
  if style == "terse":
    answer = ", ".join(items)
  else:
    answer = _pick(rng, [", ".join(items[:-1]).capitalize() + f" and {items[-1]}.",
                         "Here are some: " + ", ".join(items) + ".",
                         "\n".join(f"- {x}" for x in items)])
  return [("user", question), ("assistant", answer)]


def _story(rng, style):
  animal = _pick(rng, ANIMALS)
  question = _pick(rng, [f"Tell me a short story about a {animal}.", f"Write a tiny story about a {animal}.",
                         f"Story about a {animal}, please."])
  adjective, place = _pick(rng, ADJECTIVES), _pick(rng, PLACES)
  opening = _pick(rng, OPENINGS)
  story = f"{opening}, a {adjective} {animal} lived near a {place}. It wanted to {_pick(rng, GOALS)}."
  if style != "terse":
    story += f" {_pick(rng, MIDDLES)}."
  story += f" {_pick(rng, ENDINGS)}"
  return [("user", question), ("assistant", story)]


def _tool(rng, style):
  del style  # tool conversations carry their own system prompt
  if rng.random() < 0.5:
    a, b = rng.randint(100, 999), rng.randint(10, 99)
    expression = f"{a} * {b}"
    turns = [("system", TOOL_SYSTEM),
             ("user", _pick(rng, [f"What is {expression}?", f"Please compute {expression}."])),
             ("assistant", '<tool_call>{"name": "calculator", "expression": "' + expression + '"}</tool_call>'),
             ("tool", str(a * b)),
             ("assistant", _pick(rng, [f"{expression} = {a * b}.", f"The result is {a * b}.",
                                       f"It is {a * b}."]))]
  else:
    city, temp, sky = _pick(rng, CITIES), rng.randint(-5, 35), _pick(rng, SKIES)
    turns = [("system", TOOL_SYSTEM),
             ("user", _pick(rng, [f"What's the weather in {city}?", f"Is it warm in {city}?"])),
             ("assistant", '<tool_call>{"name": "get_weather", "city": "' + city + '"}</tool_call>'),
             ("tool", json.dumps({"city": city, "temp_c": temp, "sky": sky})),
             ("assistant", _pick(rng, [f"It is {temp} degrees and {sky} in {city}.",
                                       f"{city}: {sky}, {temp} degrees.",
                                       f"Right now {city} is {sky} at {temp} degrees."]))]
  return turns


# The two tools as OpenAI function schemas, for the OpenAI layout of the tool conversations.
TOOL_SCHEMAS = [
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluates an arithmetic expression.",
        "parameters": {"type": "object", "properties": {
            "expression": {"type": "string", "description": "The expression, such as 12 * 34."}},
                       "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "The city's name."}}, "required": ["city"]}}},
]
# The OpenAI layout's system prompt: the tools and their call syntax are the chat template's to render.
OPENAI_TOOL_SYSTEM = "You can call tools."
_TEXT_CALL = re.compile(r"^<tool_call>(\{.*\})</tool_call>$", re.DOTALL)


def openai_tool_row(turns) -> dict:
  """A tool conversation of `_tool` in the OpenAI layout: the call turn as `tool_calls` (content null, the
  arguments a JSON string, as the OpenAI API returns them), the result as a `tool` message answering its id."""
  messages, calls = [], []
  for role, content in turns:
    match = _TEXT_CALL.match(content) if role == "assistant" else None
    if role == "system":
      messages.append({"role": "system", "content": OPENAI_TOOL_SYSTEM})
    elif match:
      arguments = json.loads(match.group(1))
      calls.append((f"call_{len(calls)}", arguments.pop("name")))
      messages.append({"role": "assistant", "content": None, "tool_calls": [
          {"id": calls[-1][0], "type": "function",
           "function": {"name": calls[-1][1], "arguments": json.dumps(arguments)}}]})
    elif role == "tool":
      messages.append({"role": "tool", "tool_call_id": calls[-1][0], "name": calls[-1][1], "content": content})
    else:
      messages.append({"role": role, "content": content})
  return {"messages": messages, "tools": TOOL_SCHEMAS}


def calls_tools(turns) -> bool:
  return any(role == "tool" for role, _ in turns)


KINDS = [(_arithmetic, 0.32), (_synonym, 0.2), (_listing, 0.16), (_story, 0.24), (_tool, 0.08)]


def make_conversations(seed: int, n: int) -> list[list[tuple[str, str]]]:
  """`n` conversations as lists of (role, content), the same for the same seed."""
  rng = random.Random(seed)
  conversations = []
  for _ in range(n):
    kind = _pick(rng, [k for k, _ in KINDS], [w for _, w in KINDS])
    style = _pick(rng, ["plain", "terse", "friendly"], [0.8, 0.1, 0.1])
    turns = kind(rng, style)
    if style != "plain" and kind is not _tool:
      turns = [("system", TERSE if style == "terse" else FRIENDLY)] + turns
    conversations.append(turns)
  return conversations


SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt", "tool": "tool"}


def write_datasets(conversations, out_dir: str) -> None:
  """Writes chat_sharegpt.jsonl and chat_messages.jsonl (the same conversations) into `out_dir`, and
  chat_tools_openai.jsonl: those that call tools, in the OpenAI layout."""
  os.makedirs(out_dir, exist_ok=True)
  compact = dict(ensure_ascii=False, separators=(",", ":"))
  with open(os.path.join(out_dir, "chat_sharegpt.jsonl"), "w", encoding="utf-8") as f:
    for turns in conversations:
      row = {"conversations": [{"from": SHAREGPT_ROLE[r], "value": c} for r, c in turns]}
      f.write(json.dumps(row, **compact) + "\n")
  with open(os.path.join(out_dir, "chat_messages.jsonl"), "w", encoding="utf-8") as f:
    for turns in conversations:
      f.write(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}, **compact) + "\n")
  with open(os.path.join(out_dir, "chat_tools_openai.jsonl"), "w", encoding="utf-8") as f:
    for turns in conversations:
      if calls_tools(turns):
        f.write(json.dumps(openai_tool_row(turns), **compact) + "\n")


# ---------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------


def train_tokenizer(texts, *, vocab_size: int = VOCAB_SIZE, chat_template: str = CHATML_TEMPLATE):
  """A byte-level BPE `PreTrainedTokenizerFast` with ChatML specials (used by the tests with other sizes)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  # Keep offsets untrimmed so a token's span covers its leading space, as Qwen2's tokenizer does.
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                 additional_special_tokens=SPECIAL_TOKENS[1:], chat_template=chat_template,
                                 model_max_length=4096)


def train_metaspace_tokenizer(texts, *, vocab_size: int = OTHER_VOCAB_SIZE, chat_template: str = CHATML_TEMPLATE):
  """A SentencePiece-style BPE (spaces as a "▁" prefix, punctuation left on its word, no byte fallback):
  trained on the same text as the byte-level BPE, its tokens still end at other characters (about 80% of
  either side's token ends are shared), as two model families' tokenizers do. The tokenizer of the tiny
  cross-tokenizer teacher. (A Unigram model would be closer to SentencePiece, but the tokenizers library
  does not train one reproducibly.)"""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS, "<unk>"], show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                 unk_token="<unk>", additional_special_tokens=SPECIAL_TOKENS[1:],
                                 chat_template=chat_template, model_max_length=4096)


def tokenizer_corpus(conversations) -> list[str]:
  return [f"{role}\n{content}" for turns in conversations for role, content in turns]
