"""jaxkd's `eval --task mc / gen` against lm-evaluation-harness's HF backend, on the same local files and prompts.

  pip install lm-eval          # anywhere: --lm_eval names its command (a separate virtualenv is fine)
  python scripts/compare_lm_eval.py [--model tiny:teacher-trained] [--lm_eval lm_eval] [--workdir /tmp/cmp]

Writes small task files into --workdir in the layouts of MMLU, ARC, raw HellaSwag, BBH, pre-rendered chat prompts
and GSM8K, each with the lm-eval task YAML of its lm-eval task (that task's prompt, the file as test and few-shot
split), runs `lm_eval --model hf --model_args pretrained=MODEL,dtype=float32 --log_samples` on them and jaxkd's
tasks on the same files, and prints per task: the metrics of both, whether every context, continuation and
generation is the same string, and the largest difference of a choice's log-likelihood.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxkd import benchmarks, tiny  # noqa: E402
from tests.data_references import CHAT, CHAT_MC_ROWS  # noqa: E402


def _arith(a, b, op):
  return a + b if op == "plus" else a - b


def make_rows() -> dict:
  """The task files' rows: questions in the bundled chats' grammar, so the tiny teacher gets some right."""
  pairs = [(4, 9, "plus"), (20, 14, "minus"), (2, 6, "plus"), (7, 7, "plus"), (5, 5, "plus"), (15, 3, "minus"),
           (8, 1, "plus"), (12, 4, "minus"), (3, 4, "plus"), (9, 9, "plus")]
  mmlu, arc, gsm8k, chat_gen = [], [], [], []
  for i, (a, b, op) in enumerate(pairs):
    r = _arith(a, b, op)
    wrong = [r + 1, r * 10 + 1, abs(r - 2) + 100]
    choices = [str(x) for x in [r, *wrong]]
    k = i % 4
    choices[0], choices[k] = choices[k], choices[0]
    mmlu.append({"question": f" What is {a} {op} {b}? ", "choices": choices, "answer": k,
                 "subject": "elementary_mathematics"})
    labels = ["A", "B", "C", "D"] if i % 2 else ["1", "2", "3", "4"]
    arc.append({"id": f"q{i}", "question": f"What is {a} {op} {b}?",
                "choices": {"text": [f"It is {c}." if j % 2 else c for j, c in enumerate(choices)], "label": labels},
                "answerKey": labels[k]})
    sign = "+" if op == "plus" else "-"
    gsm8k.append({"question": f"What is {a} {op} {b}?",
                  "answer": f"{a} {sign} {b} = <<{a}{sign}{b}={r}>>{r}.\n#### {r}"})
    chat_gen.append({"question": f"{a} {sign} {b} = ?", "answer": f"#### {r}"})
  hellaswag = []
  for i, (activity, ctx_a, ctx_b, endings) in enumerate([
      ("Cooking", "A man stands in a kitchen [title] He picks up a knife.", "he",
       ["cuts the onions [step] into rings.", "sings to the moon.", "drives a car into the lake.", "sleeps."]),
      ("Painting", "A woman holds a brush.", "she",
       ["dips it in blue paint.", "eats the brush [header] quickly.", "flies away.", "is a horse."]),
      ("Running", "A boy ties his shoes [title] Then he stretches.", "the boy",
       ["starts to run along the river.", "turns into a tree.", "reads a book.", "swims in the sky."]),
      ("Gardening", "An old man kneels by a bed of roses.", "he",
       ["pulls the weeds.", "plays the drums.", "builds a rocket [step] today.", "bakes bread."]),
      ("Fishing", "Two friends sit in a boat.", "they",
       ["cast their lines into the water.", "sell the boat.", "dance.", "paint the fish."]),
      ("Reading", "A girl opens a book [title] She turns the page.", "she",
       ["reads the next chapter.", "eats the page.", "jumps over the moon.", "is a cloud."])]):
    hellaswag.append({"ind": i, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b,
                      "ctx": f"{ctx_a} {ctx_b}", "endings": endings, "label": str((i * 3) % 4),
                      "split": "val", "source_id": f"src{i}"})
  bbh = [{"input": f"not ( {x} ) and ( {y} ) is", "choices": ["True", "False"],
          "target": str((not x) and y)} for x in (True, False) for y in (True, False)]
  bbh += [{"input": f"( {x} or {y} ) is", "choices": ["True", "False"], "target": str(x or y)}
          for x in (True, False) for y in (True, False)]
  chat_mc = [*CHAT_MC_ROWS, {"query": CHAT.format("Can you name 4 colors?"),
                            "choices": ["Blue, purple, white and orange.", "Dog.", "Four."], "gold": 0}]
  # MMLU as lm-eval runs it: one task per subject, its examples the first of that subject's dev rows
  subjects = ["elementary_mathematics", "high_school_mathematics"]
  mmlu_test = [{**r, "subject": subjects[i // 5]} for i, r in enumerate(mmlu)]
  mmlu_dev = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 2), str(a), str(b)],
               "answer": 0, "subject": subjects[i % 2]} for i, (a, b) in enumerate([(1, 1), (2, 3), (6, 2), (4, 4)])]
  gsm8k_train = [{"question": f"What is {a} plus {b}?",
                  "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}.\n#### {a + b}"} for a, b in [(1, 2), (3, 3), (6, 1), (2, 9), (5, 5), (7, 7), (4, 1), (8, 8), (3, 6)]]
  return {"mmlu": mmlu, "arc": arc, "hellaswag": hellaswag, "bbh": bbh, "chat_mc": chat_mc, "gsm8k": gsm8k,
          "chat_gen": chat_gen, "mmlu_subjects": mmlu_test, "mmlu_subjects_dev": mmlu_dev,
          "gsm8k_trainshots": gsm8k, "gsm8k_trainshots_train": gsm8k_train}


_MC_METRICS = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
               {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]
_GSM8K = {"output_type": "generate_until", "doc_to_target": "{{answer}}",
          "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                           "ignore_case": True, "ignore_punctuation": False,
                           "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}],
          "generation_kwargs": {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False,
                                "temperature": 0.0},
          "filter_list": [{"name": "strict-match", "filter": [{"function": "regex",
                                                               "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                                                              {"function": "take_first"}]},
                          {"name": "flexible-extract", "filter": [{"function": "regex", "group_select": -1,
                                                                   "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                                                                  {"function": "take_first"}]}]}

_MMLU = {"output_type": "multiple_choice", "fewshot_config": {"sampler": "first_n"},
         "description": "The following are multiple choice questions (with answers) about "
                        "{{subject.replace('_', ' ')}}.\n\n",
         "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                        "D. {{choices[3]}}\nAnswer:",
         "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer", "metric_list": _MC_METRICS}

# name: (lm-eval YAML fields (lm-eval's own task's), jaxkd's prompt, few-shot count, few-shot split: None for the
# file itself, else that of rows NAME_SPLIT; the field lm-eval makes one task per value of (MMLU's subjects))
TASKS = {
    "mmlu": (_MMLU, "mmlu", 2, None, None),
    "mmlu_subjects": (_MMLU, "mmlu", 2, "dev", "subject"),
    "arc": ({"output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
             "doc_to_target": "{{choices.label.index(answerKey)}}", "doc_to_choice": "{{choices.text}}",
             "metric_list": _MC_METRICS}, "arc", 3, None, None),
    "hellaswag": ({"output_type": "multiple_choice", "process_docs": "!function utils.process_docs",
                   "doc_to_text": "{{query}}", "doc_to_target": "{{label}}", "doc_to_choice": "choices",
                   "metric_list": _MC_METRICS}, "hellaswag", 2, None, None),
    "bbh": ({"output_type": "multiple_choice", "fewshot_config": {"sampler": "first_n"},
             "doc_to_text": "Q: {{input}}\nA:", "doc_to_target": "{{target}}", "doc_to_choice": "{{choices}}",
             "metric_list": _MC_METRICS}, "bbh", 3, None, None),
    "chat_mc": ({"output_type": "multiple_choice", "doc_to_text": "{{query}}", "doc_to_target": "gold",
                 "doc_to_choice": "choices", "metric_list": _MC_METRICS}, "query", 0, None, None),
    "gsm8k": ({**_GSM8K, "doc_to_text": "Question: {{question}}\nAnswer:"}, "gsm8k", 5, None, None),
    "gsm8k_trainshots": ({**_GSM8K, "doc_to_text": "Question: {{question}}\nAnswer:"}, "gsm8k", 5, "train", None),
    "chat_gen": ({**_GSM8K, "doc_to_text": CHAT.format("{{question}}")}, CHAT.format("{{question}}"), 0, None, None),
}


def _lm_eval_tasks(name: str, rows: dict) -> list[tuple[str, list[dict], list[dict] | None]]:
  """lm-eval's tasks for one of TASKS: (task name, test rows, few-shot rows), one per group value."""
  _, _, _, split, group = TASKS[name]
  pool = rows[f"{name}_{split}"] if split else None
  if not group:
    return [(f"cmp_{name}", rows[name], pool)]
  values = list(dict.fromkeys(r[group] for r in rows[name]))
  return [(f"cmp_{name}_{v}", [r for r in rows[name] if r[group] == v], [r for r in pool if r[group] == v])
          for v in values]


def write_tasks(workdir: str, lm_eval_cmd: str) -> None:
  rows = make_rows()
  # lm-eval's hellaswag process_docs, from the installed package (the cleaning jaxkd reimplements)
  probe = subprocess.run([os.path.join(os.path.dirname(shutil.which(lm_eval_cmd)), "python"), "-c",
                          "import lm_eval.tasks.hellaswag.utils as u; print(u.__file__)"],
                         capture_output=True, text=True, check=True)
  shutil.copy(probe.stdout.strip(), os.path.join(workdir, "utils.py"))
  for name, (fields, _, shots, split, _) in TASKS.items():
    for part in [name] + ([f"{name}_{split}"] if split else []):
      with open(os.path.join(workdir, f"{part}.jsonl"), "w") as f:  # jaxkd reads these
        f.writelines(json.dumps(r) + "\n" for r in rows[part])
    for task, test, pool in _lm_eval_tasks(name, rows):
      files = {"test": os.path.join(workdir, f"{task}.test.jsonl")}
      if pool is not None:
        files["fewshot"] = os.path.join(workdir, f"{task}.fewshot.jsonl")
      for part, part_rows in (("test", test), ("fewshot", pool)):
        if part in files:
          with open(files[part], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part_rows)
      spec = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": files}, "test_split": "test",
              "fewshot_split": "fewshot" if pool is not None else "test", "num_fewshot": shots, **fields}
      text = json.dumps(spec, indent=1).replace('"!function utils.process_docs"', "!function utils.process_docs")
      with open(os.path.join(workdir, f"{task}.yaml"), "w") as f:  # JSON is YAML (but for the !function tag)
        f.write(text)


def run_lm_eval(workdir: str, model: str, lm_eval_cmd: str) -> dict:
  rows = make_rows()
  tasks = {name: [task for task, _, _ in _lm_eval_tasks(name, rows)] for name in TASKS}
  out = os.path.join(workdir, "lm_eval_out")
  cmd = [lm_eval_cmd, "--model", "hf", "--model_args", f"pretrained={model},dtype=float32", "--device", "cpu",
         "--batch_size", "1", "--tasks", ",".join(t for ts in tasks.values() for t in ts), "--include_path", workdir,
         "--log_samples", "--output_path", out]
  print("$", " ".join(cmd), flush=True)
  t0 = time.time()
  subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
                 capture_output=True)
  print(f"lm_eval: {time.time() - t0:.0f} s")
  results = json.load(open(sorted(glob.glob(os.path.join(out, "**", "results_*.json"), recursive=True))[-1]))
  merged = {}
  for name, names in tasks.items():  # a grouped task's samples in file order, its metrics weighted by size
    samples, sums = [], {}
    for task in names:
      path = sorted(glob.glob(os.path.join(out, "**", f"samples_{task}_2*.jsonl"), recursive=True))[-1]
      part = [json.loads(line) for line in open(path)]
      rows, offset = len({s["doc_id"] for s in part}), len({s["doc_id"] for s in samples})
      samples += [{**s, "doc_id": s["doc_id"] + offset} for s in part]
      for key, value in results["results"][task].items():
        if isinstance(value, float) and "stderr" not in key:
          sums[key] = sums.get(key, 0.0) + value * rows
    count = len({s["doc_id"] for s in samples})
    merged[name] = {"results": {k: v / count for k, v in sums.items()}, "samples": samples}
  return merged


def run_jaxkd(workdir: str, model: str) -> dict:
  out, t0 = {}, time.time()
  for name, (fields, prompt, shots, split, _) in TASKS.items():
    run = benchmarks.generative if fields["output_type"] == "generate_until" else benchmarks.multiple_choice
    out[name] = run(model, data_path=os.path.join(workdir, f"{name}.jsonl"), prompt=prompt, num_fewshot=shots,
                    fewshot_path=os.path.join(workdir, f"{name}_{split}.jsonl") if split else None, batch_size=8)
  print(f"jaxkd: {time.time() - t0:.0f} s")
  return out


def compare(ref: dict, ours: dict) -> list[str]:
  lines = ["| task | rows | shots | metric | lm-eval | jaxkd | same contexts | same continuations / generations | "
           "max abs log-lik. diff |", "|---|---:|---:|---|---:|---:|---|---|---:|"]
  for name in TASKS:
    res, got, samples = ref[name]["results"], ours[name], ref[name]["samples"]
    if got["task"] == "mc":
      by_doc = {s["doc_id"]: s for s in samples}
      same_ctx = same_cont = True
      diff = 0.0
      for s in got["samples"]:
        theirs = by_doc[s["doc_id"]]
        args = [theirs["arguments"][f"gen_args_{j}"] for j in range(len(s["choices"]))]
        same_ctx &= all(a["arg_0"] == s["context"] for a in args)
        same_cont &= [a["arg_1"] for a in args] == [" " + c for c in s["choices"]]
        lls = [float(r[0][0]) for r in theirs["resps"]]
        diff = max(diff, max(abs(a - b) for a, b in zip(lls, s["loglikelihoods"])))
      for i, metric in enumerate(("acc", "acc_norm")):
        lines.append(f"| cmp_{name} | {got['rows']} | {got['num_fewshot']} | {metric} | {res[metric + ',none']:.4f} "
                     f"| {got[metric]:.4f} | " + (f"{same_ctx} | {same_cont} | {diff:.2e} |" if i == 0 else "| | |"))
    else:
      gens = {(s["doc_id"], s["filter"]): s for s in samples}
      same_ctx = all(gens[(s["doc_id"], "strict-match")]["arguments"]["gen_args_0"]["arg_0"] == s["context"]
                     for s in got["samples"])
      same_gen = all(gens[(s["doc_id"], "strict-match")]["resps"][0][0] == s["generation"] for s in got["samples"])
      for i, f in enumerate(benchmarks.FILTERS):
        lines.append(f"| cmp_{name} | {got['rows']} | {got['num_fewshot']} | exact_match {f} | "
                     f"{res['exact_match,' + f]:.4f} | {got['exact_match'][f]:.4f} | "
                     + (f"{same_ctx} | {same_gen} | |" if i == 0 else "| | |"))
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="tiny:teacher-trained")
  parser.add_argument("--lm_eval", default="lm_eval", help="the lm_eval command (of any virtualenv)")
  parser.add_argument("--workdir", default="/tmp/jaxkd_lm_eval_compare")
  args = parser.parse_args()
  model = tiny.resolve(args.model)
  if shutil.which(args.lm_eval) is None:
    sys.exit(f"no {args.lm_eval!r} command: pip install lm-eval (or pass --lm_eval /path/to/venv/bin/lm_eval)")
  os.makedirs(args.workdir, exist_ok=True)
  write_tasks(args.workdir, args.lm_eval)
  ref = run_lm_eval(args.workdir, model, args.lm_eval)
  ours = run_jaxkd(args.workdir, model)
  print("\n".join(compare(ref, ours)))


if __name__ == "__main__":
  main()
