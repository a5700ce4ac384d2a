"""The answer checks against the generator's own answers (right) and corrupted ones (wrong); eval --task answers
on the bundled trained teacher against a random student."""

import json
import os
import re
import subprocess
import sys

import numpy as np

from jaxkd import answers, data, eval as eval_lib, generate, models, tiny
from jaxkd.config_base import base_config, tiny_defaults
from jaxkd.data import synthetic
from jaxkd.data.sources import eval_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _held_out():
  return list(data.held_out_conversations(tiny_defaults(base_config()).data))


def test_held_out_conversations_are_the_rows_training_holds_out():
  cfg = tiny_defaults(base_config()).data
  with open(data.CHAT_MESSAGES) as f:
    rows = [json.loads(line)["messages"] for line in f]
  held = np.flatnonzero(eval_rows(np.arange(len(rows)), cfg.eval_fraction, cfg.eval_seed))
  assert 60 < len(held) < 200
  assert _held_out() == [rows[i] for i in held]


def test_every_reference_answer_is_right_and_every_turn_parses():
  """The generator's own answers, for the whole bundled set: every assistant turn is a scored question or a
  story, and every reference is judged right."""
  conversations = [[{"role": r, "content": c} for r, c in turns]
                   for turns in synthetic.make_conversations(synthetic.DEFAULT_SEED, synthetic.NUM_CONVERSATIONS)]
  found = answers.all_questions(conversations)
  turns = sum(m["role"] == "assistant" for c in conversations for m in c)
  stories = sum(c[-1]["content"].endswith(tuple(synthetic.ENDINGS)) for c in conversations)
  assert found.skipped == {"story": stories} and len(found.questions) + stories == turns
  out = answers.score(found.questions, [q.reference for q in found.questions], found.skipped)
  assert out["accuracy"] == 1.0 and set(out["categories"]) == set(answers.SCORED)
  assert all(c["total"] >= 100 for c in out["categories"].values())
  held = answers.all_questions(_held_out())
  assert all(q.check(q.reference) for q in held.questions) and held.skipped["unparsed"] == 0


def _replace_last_int(text, f):
  m = list(re.finditer(r"-?\d+", text))[-1]
  return text[:m.start()] + str(f(int(m.group()))) + text[m.end():]


def _sub_word(text, old, new, count=1):
  return re.sub(rf"\b{old}\b", new, text, count=count, flags=re.I)


def _corruptions(q):
  """Wrong versions of a right reply, made from the reply's text and the question's words alone."""
  ref, asked = q.reference, q.messages[-1]["content"]
  said = re.findall(r"[a-z]+", ref.lower())
  if q.category in ("arithmetic", "followup") or (q.category == "tool_answer" and "degrees" not in ref):
    return [_replace_last_int(ref, lambda n: n + 1), _replace_last_int(ref, lambda n: n - 10), ref + " Or 1000."]
  if q.category == "synonym":
    word = next(w for w in synthetic.SYNONYMS if re.search(rf"\b{w}\b", asked))
    mine = [w for w in said if w in synthetic.SYNONYMS[word][0]]
    other = next(s for w, (options, _) in synthetic.SYNONYMS.items() if w != word for s in options)
    out = [_sub_word(ref, mine[0], other), _sub_word(ref, mine[0], word)]  # another word's synonym; the word
    if len(mine) == 2:  # "two words": one given twice
      out.append(_sub_word(ref, mine[1], mine[0]))
    return out
  if q.category == "listing":
    category = next(c for c in synthetic.CATEGORIES if c in asked)
    mine = [w for w in said if w in synthetic.CATEGORIES[category]]
    other = next(x for c, xs in synthetic.CATEGORIES.items() if c != category for x in xs
                 if x not in synthetic.CATEGORIES[category])
    spare = next(x for x in synthetic.CATEGORIES[category] if x not in mine)
    return [_sub_word(ref, mine[-1], ""), _sub_word(ref, mine[-1], other), _sub_word(ref, mine[-1], mine[0]),
            ref + f" And {spare}."]  # one short, one from another category, one twice, one too many
  if q.category == "tool_call":
    call = json.loads(re.search(r"<tool_call>(.*)</tool_call>", ref).group(1))
    out = [ref.replace(call["name"], "search"), ref.replace("}</tool_call>", "</tool_call>"), ref + ref,
           ref.replace("<tool_call>", "")]
    if "city" in call:
      out.append(ref.replace(call["city"], next(c for c in synthetic.CITIES if c != call["city"])))
    else:  # another number, another operator
      a, op, b = call["expression"].split()
      out += [ref.replace(call["expression"], f"{int(a) + 1} {op} {b}"),
              ref.replace(call["expression"], f"{a} + {b}")]
    return out
  facts = json.loads(q.messages[-1]["content"])  # the weather answer
  return [_replace_last_int(ref, lambda n: n + 1),  # the temperature: the reply's only number
          _sub_word(ref, facts["sky"], next(s for s in synthetic.SKIES if s != facts["sky"])),
          _sub_word(ref, facts["city"], next(c for c in synthetic.CITIES if c != facts["city"])),
          _sub_word(ref, facts["sky"], "")]


def test_corrupted_answers_are_wrong():
  found = answers.all_questions(_held_out())
  assert {q.category for q in found.questions} == set(answers.SCORED)
  judged = 0
  for q in found.questions:
    for wrong in _corruptions(q):
      assert wrong != q.reference
      assert not q.check(wrong), (q.category, q.messages[-1]["content"], q.reference, wrong)
      judged += 1
  assert judged > 3 * len(found.questions)


def test_follow_ups_continue_from_the_previous_result():
  turns = [("What is 2 + 3?", "5."), ("And plus 4?", "9"), ("Now - 10.", "-1"), ("What if I add 2?", "1"),
           ("Compute 6 * 7.", "42"), ("What if I subtract 50?", "-8")]
  messages = [{"role": r, "content": c} for u, a in turns for r, c in (("user", u), ("assistant", a))]
  found = answers.questions(messages)
  assert [q.category for q in found.questions] == ["arithmetic"] + ["followup"] * 3 + ["arithmetic", "followup"]
  assert all(q.check(q.reference) for q in found.questions)
  assert [len(q.messages) for q in found.questions] == [1, 3, 5, 7, 9, 11]  # each prompt ends at its question
  plus4, minus10, add2 = found.questions[1:4]
  assert plus4.check("5 + 4 = 9.") and not plus4.check("4") and not plus4.check("2 + 3 + 4 = 10")
  assert minus10.check("9 - 10 = -1.") and not minus10.check("9 - 10 = 1.") and not minus10.check("-10")
  assert add2.check("It is 1.") and not add2.check("It is 2.") and not add2.check("-1 plus 2 is 3.")
  assert found.questions[5].check("42 - 50 = -8") and not found.questions[5].check("1 - 50 = -49")


def test_turns_outside_the_grammar_are_skipped_and_counted():
  def skipped(*turns):
    found = answers.questions([{"role": r, "content": c} for r, c in turns])
    return len(found.questions), dict(found.skipped)

  assert skipped(("user", "What is the capital of France?"), ("assistant", "Paris.")) == (0, {"unparsed": 1})
  assert skipped(("user", "And plus 4?"), ("assistant", "9")) == (0, {"unparsed": 1})  # nothing to continue
  assert skipped(("user", "Who won?"), ("assistant", "?"), ("user", "And plus 4?"), ("assistant", "9")) == (
      0, {"unparsed": 2})
  assert skipped(("user", "Story about a fox, please."), ("assistant", "Once upon a time ...")) == (0, {"story": 1})
  assert skipped(("user", "What is 2 + 3?"), ("assistant", "5"), ("assistant", "five")) == (1, {"unparsed": 1})
  # A calculator question without the tool system prompt is arithmetic; a tool result nobody asked for is not
  # a question.
  assert skipped(("user", "What is 123 * 45?"), ("assistant", "5535"), ("tool", "5535"), ("assistant", "ok")) == (
      1, {"unparsed": 1})
  assert skipped(("system", synthetic.TOOL_SYSTEM), ("user", "Tell me a joke."), ("assistant", "No.")) == (
      0, {"unparsed": 1})


def test_tool_names_and_numbers_read_as_the_grammar_writes_them():
  for name, argument in (answers.CALCULATOR, answers.WEATHER):
    assert f"{name}({argument})" in synthetic.TOOL_SYSTEM
  assert answers.integers("20-14 = 6, 5 - 9 = -4, 12,345 and 2, 3.5") == [20, 14, 6, 5, 9, -4, 12345, 2, 3, 5]


def test_trained_teacher_answers_far_more_than_a_random_student(tmp_path):
  """Measured at --limit 48 (the first 48 held-out questions): the trained teacher 0.29 (14 right), the random
  student 0 (it answers with newlines)."""
  limit = 48
  teacher = eval_lib.answers_accuracy("tiny:teacher-trained", limit=limit, max_new_tokens=40, batch_size=limit)
  assert teacher["total"] == limit and teacher["skipped"]["unparsed"] == 0
  assert sum(c["total"] for c in teacher["categories"].values()) == limit
  # Bucketed, batched greedy replies are the ones generate() gives each prompt unpadded.
  folder = tiny.resolve("tiny:teacher-trained")
  tok = data.load_tokenizer(folder)
  found = answers.all_questions(_held_out(), limit=6)
  ids = [generate.encode_messages(tok, q.messages) for q in found.questions]
  alone = generate.generate(models.from_pretrained(folder), ids, max_new_tokens=40,
                            eos_ids=generate.eos_ids_of(tok), vocab_size=len(tok))
  assert [tok.decode(x, skip_special_tokens=True).strip() for x in alone] == [
      a["reply"] for a in teacher["answers"][:6]]
  assert sum(a["right"] for a in teacher["answers"]) == teacher["correct"]

  out_path = tmp_path / "student.json"
  run = subprocess.run([sys.executable, "-m", "jaxkd.eval", "--task", "answers", "--model", "tiny:student",
                        "--limit", str(limit), "--max_new_tokens", "40", "--batch_size", str(limit),
                        "--output", str(out_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "answers right" in run.stdout and "stories (no single right answer)" in run.stdout
  student = json.loads(out_path.read_text())
  assert student["total"] == limit
  assert teacher["accuracy"] > student["accuracy"] + 0.15, (teacher["accuracy"], student["accuracy"])
