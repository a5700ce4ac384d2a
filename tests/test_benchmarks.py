"""Multiple-choice and generative benchmark tasks: choice log-likelihoods against transformers' PyTorch model in
float64, batching and sharding against one row at a time, acc / acc_norm, lm-eval's few-shot samplers and
prompt, GSM8K's extraction filters, and greedy generation cut at stop strings against transformers'."""

import json
import random

import numpy as np
import pytest
import torch
import transformers as tf

from jaxkd import benchmarks, data, loglikelihood, models, sharding, tiny
from tests.data_references import CHAT, CHAT_MC_ROWS

TEACHER = tiny.resolve("tiny:teacher-trained")
# The chat rows, and one plain-text row.
QUERY_ROWS = [
    *CHAT_MC_ROWS,
    {"query": "Question: What is 3 plus 4?\nAnswer:", "choices": ["7", "8", "43"], "gold": 0},
]


def _write(tmp_path, name, rows):
  path = tmp_path / name
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


@pytest.fixture(scope="module")
def torch_teacher():
  return tf.AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()


def _reference_loglikelihood(torch_model, ctx, cont):
  """float64 log-softmax of transformers' logits over the whole head, summed over the continuation."""
  with torch.no_grad():
    logits = torch_model(torch.tensor([ctx + cont])).logits[0].double().numpy()
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  rows = np.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
  return logp[rows, cont].sum(), bool((logits[rows].argmax(-1) == cont).all())


def test_encode_pair_moves_the_contexts_trailing_space_to_the_continuation(tok):
  ctx, cont = loglikelihood.encode_pair(tok, "Answer: ", "13")
  assert (ctx, cont) == (tok("Answer:")["input_ids"], tok(" 13")["input_ids"])
  assert tok("Answer: ")["input_ids"] != ctx  # the space alone is a token: left on the context it would differ
  ctx, cont = loglikelihood.encode_pair(tok, "Q", " 1")
  assert ctx + cont == tok("Q 1")["input_ids"]
  assert loglikelihood.encode_pair(tok, "", " 1") == ([tok.eos_token_id], tok(" 1")["input_ids"])  # no BOS: EOS


def test_multiple_choice_equals_transformers_and_one_row_at_a_time(tmp_path, torch_teacher):
  """Batched on an 8-device FSDP mesh: each choice's log-likelihood and is_greedy equal transformers' (float32
  model, float64 reference, 1e-4); acc and acc_norm are the argmaxes of those (they differ on this file); one row
  at a time without a mesh gives the same numbers."""
  path = _write(tmp_path, "query.jsonl", QUERY_ROWS)
  out = benchmarks.multiple_choice(TEACHER, data_path=path, batch_size=8)
  assert out["prompt"] == "hellaswag" and out["rows"] == len(QUERY_ROWS)
  tok = data.load_tokenizer(TEACHER)
  accs, norms = [], []
  for row, sample in zip(QUERY_ROWS, out["samples"]):
    assert sample["context"] == row["query"] and sample["choices"] == row["choices"]
    ref = [_reference_loglikelihood(torch_teacher, *loglikelihood.encode_pair(tok, row["query"], " " + c))
           for c in row["choices"]]
    np.testing.assert_allclose(sample["loglikelihoods"], [ll for ll, _ in ref], atol=1e-4, rtol=0)
    assert sample["is_greedy"] == [g for _, g in ref]
    lls = np.array([ll for ll, _ in ref])
    accs.append(float(lls.argmax() == row["gold"]))
    norms.append(float((lls / np.array([len(c) for c in row["choices"]])).argmax() == row["gold"]))
  assert (out["acc"], out["acc_norm"]) == (np.mean(accs), np.mean(norms))
  assert out["acc"] != out["acc_norm"]
  np.testing.assert_allclose(out["acc_stderr"], np.std(accs, ddof=1) / np.sqrt(len(accs)))

  model = models.from_pretrained(TEACHER, dtype="float32")
  alone = benchmarks.multiple_choice(model, tok, data_path=path, batch_size=1)
  flat = lambda res: [ll for s in res["samples"] for ll in s["loglikelihoods"]]
  np.testing.assert_allclose(flat(alone), flat(out), atol=2e-5, rtol=0)
  assert [s["is_greedy"] for s in alone["samples"]] == [s["is_greedy"] for s in out["samples"]]


def test_one_token_choices_share_a_row_and_equal_transformers(torch_teacher):
  """One-token choices (MMLU's letters) have the same input and share one row; each still gets its own
  log-likelihood (against transformers), next to multi-token choices and another question in the same batch."""
  model, tok = models.from_pretrained(TEACHER, dtype="float32"), data.load_tokenizer(TEACHER)
  q1, q2 = "Which is an animal?\nAnswer:", "What is 2 + 6?\nAnswer:"  # " cat", " dog", ... are one token each
  requests = [(q1, " cat"), (q1, " blue"), (q1, " dog"), (q2, " A"), (q2, " the"), (q2, " 8"), (q2, " the cat")]
  pairs = [loglikelihood.encode_pair(tok, *r) for r in requests]
  assert len({tuple(c + x[:-1]) for c, x in pairs}) == 4  # q1's three choices share one input, q2's " A", " the"
  got = loglikelihood.loglikelihoods(model, tok, requests, batch_size=2)
  for pair, (ll, greedy) in zip(pairs, got):
    ref_ll, ref_greedy = _reference_loglikelihood(torch_teacher, *pair)
    np.testing.assert_allclose(ll, ref_ll, atol=1e-4)
    assert greedy == ref_greedy


def test_score_tokens_cuts_long_rows_from_the_left_as_lm_eval(tok, torch_teacher):
  """A row longer than the model keeps its last max_position_embeddings + 1 tokens (the last one only a target)."""
  model = models.from_pretrained(TEACHER, dtype="float32")
  model.cfg = model.cfg.replace(max_position_embeddings=40)  # read by the fit checks only (no rope scaling)
  ids = tok(" ".join(["What is 4 plus 9? The answer is 13."] * 6))["input_ids"]
  assert len(ids) > 60
  [(ll, greedy)] = loglikelihood.score_tokens(model, [(ids[:-3], ids[-3:])], batch_size=1)
  ref_ll, ref_greedy = _reference_loglikelihood(torch_teacher, ids[-41:-3], ids[-3:])
  np.testing.assert_allclose(ll, ref_ll, atol=1e-4)
  assert greedy == ref_greedy


def test_choice_metrics_on_a_case_where_acc_and_acc_norm_differ():
  got = benchmarks.choice_metrics([-3.0, -4.0], ["ab", "abcdefgh"], gold=1)  # per char: -1.5 and -0.5
  assert (got["pred"], got["pred_norm"], got["acc"], got["acc_norm"]) == (0, 1, 0.0, 1.0)
  assert benchmarks.choice_metrics([-1.0, -1.0], ["a", "b"], gold=1)["pred"] == 0  # ties: the first, as np.argmax


def test_row_layouts_and_gold_answers():
  mmlu = benchmarks.mc_doc({"question": "q", "choices": ["a", "b"], "answer": 1})
  arc = benchmarks.mc_doc({"question": "q", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]},
                           "answerKey": "3"})
  pro = benchmarks.mc_doc({"question": "q", "options": ["a", "b", "c"], "answer": "C"})
  bbh = benchmarks.mc_doc({"input": "q", "choices": ["True", "False"], "target": "False"})
  hella = benchmarks.mc_doc({"activity_label": "Cooking", "ctx_a": "A man [title] cuts.", "ctx_b": "he",
                             "endings": ["stirs [step] it.", "sings."], "label": "1"})
  assert [d["gold"] for d in (mmlu, arc, pro, bbh, hella)] == [1, 2, 2, 1, 1]
  assert arc["choices"] == ["a", "b", "c"]
  # lm-eval's hellaswag preprocess: " [title]" -> ". ", other brackets dropped, double spaces closed
  assert hella["query"] == "Cooking: A man. cuts. He" and hella["choices"] == ["stirs it.", "sings."]
  assert [benchmarks.auto_prompt(r, "mc") for r in (
      {"question": "q", "choices": ["a"]}, {"question": "q", "choices": {"text": []}}, {"options": []},
      {"query": "q"}, {"ctx_a": "", "ctx_b": "", "activity_label": ""}, {"input": "q"})] == [
          "mmlu", "arc", "mmlu_pro", "hellaswag", "hellaswag", "bbh"]
  with pytest.raises(data.DataError, match=r"gold answer=7 names none of its 2 choices"):
    benchmarks.mc_doc({"question": "q", "choices": ["a", "b"], "answer": 7})
  with pytest.raises(data.DataError, match=r"needs a field the row lacks .*--doc_to_text"):
    benchmarks.render("{{question}}", {"query": "q"})


def test_fewshot_samplers_draw_lm_evals_rows():
  """The default sampler is lm-eval's ContextSampler: one random.Random(1234) per task drawing, for each evaluated
  row in turn, k + 1 docs and dropping the row's copies (few-shot split = test split), or k docs of another split;
  first_n takes the first k other rows. Grouped by subject, each subject is a task of its own (MMLU)."""
  rows = [{"q": i % 7} for i in range(9)]  # rows 0/7 and 1/8 are equal: neither is the other's example
  got = benchmarks.fewshot_indices(rows, 9, 3, sampler="default")
  rnd = random.Random(1234)
  for i, row in enumerate(rows):  # lm-eval's sample(), on the docs themselves
    drawn = [x for x in rnd.sample(rows, 4) if x != row][:3]
    if len(drawn) < 3:
      drawn = rnd.sample([x for x in rows if x != row], 3)
    assert [rows[j] for j in got[i]] == drawn
    assert row not in drawn
  assert benchmarks.fewshot_indices(rows, 2, 3, sampler="first_n") == [[1, 2, 3], [0, 2, 3]]
  assert benchmarks.fewshot_indices(rows, 2, 0) == [[], []]
  with pytest.raises(ValueError, match="lower --num_fewshot"):
    benchmarks.fewshot_indices(rows[:3], 1, 3)

  pool = [{"q": 100 + i, "subject": "ab"[i % 2]} for i in range(10)]
  tests = [{"q": i, "subject": "ab"[i // 3]} for i in range(6)]
  got = benchmarks.fewshot_indices(tests, 6, 2, pool=pool, group="subject")
  for subject in "ab":  # per subject: a fresh Random(1234), k docs of that subject's pool rows for each row
    rnd, members = random.Random(1234), [x for x in pool if x["subject"] == subject]
    for i in [i for i, t in enumerate(tests) if t["subject"] == subject]:
      assert [pool[j] for j in got[i]] == rnd.sample(members, 2)
  assert benchmarks.fewshot_indices(tests, 4, 2, pool=pool, sampler="first_n", group="subject") == [
      [0, 2], [0, 2], [0, 2], [1, 3]]
  assert benchmarks.fewshot_indices(tests, 1, 2, pool=pool, sampler="first_n", group="other") == [[0, 1]]


def test_mmlu_prompt_with_description_and_fewshot_examples():
  rows = [{"question": f" Q{i}? ", "choices": ["w", "x", "y", "z"], "answer": i % 4, "subject": "high_school_math"}
          for i in range(3)]
  docs = [benchmarks.mc_doc(r) for r in rows]
  p = benchmarks.PROMPTS["mmlu"]
  [shots] = benchmarks.fewshot_indices(rows, 1, 2, sampler=p.sampler, group=p.fewshot_group)
  got = benchmarks.build_context(p, docs[0], [docs[j] for j in shots], answers=["B", "C"])
  choices = "A. w\nB. x\nC. y\nD. z\nAnswer:"
  assert got == ("The following are multiple choice questions (with answers) about high school math.\n\n"
                 f"Q1?\n{choices} B\n\nQ2?\n{choices} C\n\nQ0?\n{choices}")


@pytest.mark.parametrize("text, strict, flexible", [
    ("Half of 144 is 72.\n#### 72", "72", "72"),
    ("She has $1,234.50 left.", "[invalid]", "$1,234.50"),
    ("It fell by -5 degrees", "[invalid]", "-5"),
    ("First 7, then 12 and 1", "[invalid]", "1"),
    ("#### 3.\nQuestion", "3.", "3."),
    ("no number here", "[invalid]", "[invalid]"),
])
def test_gsm8k_filters(text, strict, flexible):
  assert benchmarks.strict_match(text) == strict
  assert benchmarks.flexible_extract(text) == flexible


def test_gsm8k_exact_match():
  assert benchmarks.exact_match("$1,234.50", "Work <<1234.5=1234.5>>\n#### 1234.50")
  assert benchmarks.exact_match("3.", "#### 3")  # a final "." is ignored
  assert not benchmarks.exact_match("[invalid]", "#### 3")
  assert not benchmarks.exact_match("30", "#### 3")


def test_generative_equals_transformers_greedy_cut_at_stop_strings(tmp_path, torch_teacher):
  """Greedy generations (two rows a batch on the mesh, prompts of different lengths) equal transformers' greedy
  decoding of the same prompt ids, decoded without special tokens and cut before the first stop string; the
  extractions and exact_match follow. The chat rows stop at <|im_end|>; the few-shot row at "Question:"."""
  rows = [{"question": q, "answer": f"The answer is {a}.\n#### {a}"}
          for q, a in [("What is 2 plus 9?", 11), ("5 + 5 = ?", 10), ("20 - 14 = ?", 6), ("What is 4 plus 9?", 13)]]
  path = _write(tmp_path, "gen.jsonl", rows)
  tok = data.load_tokenizer(TEACHER)
  chat = benchmarks.generative(TEACHER, data_path=path, prompt=CHAT.format("{{question}}"), num_fewshot=0,
                               max_gen_toks=24, batch_size=2)
  shots = benchmarks.generative(TEACHER, data_path=path, limit=1, num_fewshot=2, max_gen_toks=24,
                                until=["Question:", "\n\n"])
  assert shots["samples"][0]["context"].startswith("Question: ") and shots["until"][-1] == "<|endoftext|>"
  for out in (chat, shots):
    for sample in out["samples"]:
      ids = tok(sample["context"])["input_ids"]
      # lm-eval stops when a stop string shows in the new tokens' text (special tokens included)
      ref = torch_teacher.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=0,
                                   stop_strings=out["until"], tokenizer=tok)
      text = tok.decode(ref[0, len(ids):], skip_special_tokens=True)
      for stop in out["until"]:
        text = text.split(stop)[0]
      assert sample["generation"] == text
      assert sample["extracted"]["flexible-extract"] == benchmarks.flexible_extract(text)
  assert chat["exact_match"]["strict-match"] == 0.0  # the teacher never writes "####"
  flexible = [float(benchmarks.exact_match(s["extracted"]["flexible-extract"], s["target"]))
              for s in chat["samples"]]
  assert 0 < chat["exact_match"]["flexible-extract"] == np.mean(flexible) < 1
