"""Multiple-choice and generative benchmark tasks on local JSONL files, scored as lm-evaluation-harness scores them.

`multiple_choice` scores each choice's log-likelihood after the prompt (`jaxkd.loglikelihood`) and reports acc
(the most likely choice is the gold one) and acc_norm (the most likely per character of the choice), as lm-eval
reports them for MMLU, ARC and HellaSwag. `generative` greedily generates after the prompt, cuts the text at the
first stop string and reports exact_match under GSM8K's two filters (strict-match: the number after "#### ";
flexible-extract: the last number), as lm-eval's gsm8k task does.

Rows (one JSON object a line, or one JSON list) may come in the layouts of lm-eval's common tasks' datasets:

  {"question", "choices": [...], "answer": 0}                            MMLU (cais/mmlu; "subject" optional)
  {"question", "options": [...], "answer": "C" or "answer_index": 2}      MMLU-Pro
  {"question", "choices": {"text": [...], "label": [...]}, "answerKey"}   ARC
  {"ctx_a", "ctx_b", "activity_label", "endings": [...], "label": "2"}   HellaSwag, raw (cleaned as lm-eval does)
  {"query", "choices": [...], "gold": 1}                                 any task, its prompt rendered beforehand
  {"input", "choices": [...], "target": "True"}                          BBH-like: the gold named by its text
  {"question", "answer": "... #### 42"}                                  GSM8K (generative; the gold is "answer")

A multiple-choice row's gold is the first present of gold, label, answerKey, answer_index, answer, target: an
index, a digit string, a label of `choices.label`, a choice's text, or a letter.

A prompt is a `Prompt`: lm-eval's YAML fields of the same names, `doc_to_text` a Jinja template over the row's
fields (in which `choices` is the list of choice texts), named in `PROMPTS` or given as a template. There is no
chat template (lm-eval's default, without --apply_chat_template). Few-shot examples come from the evaluated file
(never the row itself) or from another file (lm-eval's few-shot split), drawn as lm-eval's samplers draw them:
"default", one random.Random(1234) sampling row after row; "first_n", the first K rows. With the "mmlu" prompt
and rows that carry a "subject", each subject draws from its own rows, as lm-eval's one task per subject does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import string

from jaxkd.data.formats import DataError

LETTERS = string.ascii_uppercase
CHOICE_KEYS = ("choices", "endings", "options")
GOLD_KEYS = ("gold", "label", "answerKey", "answer_index", "answer", "target")
GEN_TARGET_KEYS = ("answer", "target")
FEWSHOT_SEED = 1234  # lm-eval's --fewshot_random_seed default
MAX_GEN_TOKS = 256  # lm-eval's HF model's default


@dataclasses.dataclass(frozen=True)
class Prompt:
  """How a row becomes a prompt: the fields of an lm-eval task YAML of the same names."""
  doc_to_text: str  # Jinja over the row's fields; `choices` is the list of choice texts
  choices: str = "row"  # what is scored: "row", the choice texts; "letters", A, B, C, ... (MMLU)
  description: str = ""  # Jinja over the evaluated row, before the few-shot examples
  sampler: str = "default"  # lm-eval's few-shot sampler: "default" (seeded random) or "first_n"
  num_fewshot: int = 0  # when none is asked for
  target_delimiter: str = " "  # between a prompt and its answer (the scored choice starts with it)
  fewshot_delimiter: str = "\n\n"  # after each few-shot example
  until: tuple[str, ...] = ()  # generative: stop strings (the tokenizer's EOS text is added, as lm-eval adds it)
  fewshot_group: str | None = None  # examples only from rows with the same value of this field (when all have it)


_LETTERED = "{% for c in choices %}{{ 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'[loop.index0] }}. {{ c }}\n{% endfor %}Answer:"
_QUERY = "{{query}}"
_GSM8K_UNTIL = ("Question:", "</s>", "<|im_end|>")
# lm-eval's task configs, as of lm_eval 0.4.13 (the four-choice MMLU template written as a loop: the same text).
PROMPTS = {
    "mmlu": Prompt("{{question.strip()}}\n" + _LETTERED, choices="letters", sampler="first_n",
                   fewshot_group="subject", description=(
        "{% if subject is defined %}The following are multiple choice questions (with answers) about "
        "{{ subject.replace('_', ' ') }}.\n\n{% endif %}")),
    "mmlu_pro": Prompt("{{question}}\n" + _LETTERED, choices="letters", sampler="first_n", num_fewshot=5),
    "arc": Prompt("Question: {{question}}\nAnswer:"),
    "hellaswag": Prompt(_QUERY),
    "query": Prompt(_QUERY),
    "bbh": Prompt("Q: {{input}}\nA:", sampler="first_n", num_fewshot=3),
    "gsm8k": Prompt("Question: {{question}}\nAnswer:", num_fewshot=5, until=_GSM8K_UNTIL),
}
SAMPLERS = ("default", "first_n")


# ----------------------------------------------------------------------------------------------------
# Rows and prompts.


def read_rows(path: str) -> list[dict]:
  """The rows of a JSONL file (or of a file holding one JSON list)."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if text.lstrip().startswith("["):
    rows = json.loads(text)
  else:
    try:
      rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: not JSON lines ({e}); give one JSON object a line") from e
  if not rows or not all(isinstance(r, dict) for r in rows):
    raise DataError(f"{path}: expected JSON objects, one a line (see jaxkd/benchmarks.py for the layouts)")
  return rows


def _hellaswag_clean(text: str) -> str:
  """lm-eval's hellaswag `preprocess`: WikiHow's bracketed artefacts out."""
  text = text.strip().replace(" [title]", ". ")
  return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _gold_index(row: dict, choices: list[str], labels) -> int:
  key = next((k for k in GOLD_KEYS if row.get(k) is not None), None)
  if key is None:
    raise DataError(f"a row has no gold answer (one of {', '.join(GOLD_KEYS)}); its fields: {sorted(row)}")
  value = row[key]
  index = None
  if isinstance(value, int) and not isinstance(value, bool):
    index = value
  elif isinstance(value, str):  # in lm-eval's order: a digit string is an index before it is a choice's text
    if labels and value in labels:
      index = list(labels).index(value)
    elif value.isdigit():
      index = int(value)
    elif value in choices:
      index = choices.index(value)
    elif len(value) == 1 and value in LETTERS[:len(choices)]:
      index = LETTERS.index(value)
  if index is None or not 0 <= index < len(choices):
    raise DataError(f"a row's gold {key}={value!r} names none of its {len(choices)} choices {choices!r}")
  return index


def mc_doc(row: dict) -> dict:
  """A multiple-choice row as a template sees it: its fields, with `choices` the list of choice texts and `gold`
  the index of the right one (a raw HellaSwag row also gets lm-eval's cleaned `query` and choices)."""
  doc, labels = dict(row), None
  if "query" not in row and {"ctx_a", "ctx_b", "activity_label", "endings"} <= row.keys():
    doc["query"] = _hellaswag_clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    choices = [_hellaswag_clean(e) for e in row["endings"]]
  else:
    key = next((k for k in CHOICE_KEYS if k in row), None)
    if key is None:
      raise DataError(f"a multiple-choice row needs its choices in one of {', '.join(CHOICE_KEYS)}; its fields: "
                      f"{sorted(row)}")
    choices = row[key]
    if isinstance(choices, dict):  # ARC: {"text": [...], "label": ["A", ...]}
      labels, choices = choices.get("label"), choices.get("text")
  if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
    raise DataError(f"a row's choices are not a list of strings: {choices!r}")
  doc["choices"], doc["gold"] = list(choices), _gold_index(row, list(choices), labels)
  return doc


def gen_target(row: dict) -> str:
  """A generative row's reference text (GSM8K's "answer", with its "#### N" line)."""
  key = next((k for k in GEN_TARGET_KEYS if isinstance(row.get(k), str)), None)
  if key is None:
    raise DataError(f"a generative row needs its reference as a string in one of {', '.join(GEN_TARGET_KEYS)}; "
                    f"its fields: {sorted(row)}")
  return row[key]


def auto_prompt(row: dict, task: str) -> str:
  """The name in `PROMPTS` of the prompt that row's layout comes with."""
  if task == "gen":
    return "gsm8k"
  if "query" in row or {"ctx_a", "ctx_b", "activity_label"} <= row.keys():
    return "hellaswag"
  if isinstance(row.get("choices"), dict):
    return "arc"
  if "options" in row:
    return "mmlu_pro"
  if "input" in row and "question" not in row:
    return "bbh"
  return "mmlu"


def resolve_prompt(spec: str, row: dict, task: str) -> tuple[str, Prompt]:
  """(name, Prompt) of `spec`: "auto" (by the first row's layout), a name in `PROMPTS`, or a Jinja template
  (`{{question}}`: a Prompt with the defaults, GSM8K's stop strings for the generative task)."""
  if spec == "auto":
    spec = auto_prompt(row, task)
  if spec in PROMPTS:
    return spec, PROMPTS[spec]
  if "{{" in spec:
    return "template", Prompt(spec, until=_GSM8K_UNTIL if task == "gen" else ())
  raise ValueError(f"prompt {spec!r} is neither a name ({', '.join(['auto', *PROMPTS])}) nor a Jinja template "
                   "over the row's fields such as 'Question: {{question}}\\nAnswer:'")


@dataclasses.dataclass
class _Renderer:
  """lm-eval's Jinja environment (strict about missing fields, trailing newlines kept, a regex_replace filter)."""
  env: object = None
  cache: dict = dataclasses.field(default_factory=dict)

  def __call__(self, template: str, doc: dict) -> str:
    import jinja2  # pylint: disable=import-outside-toplevel

    if self.env is None:
      self.env = jinja2.Environment(loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined,
                                    keep_trailing_newline=True)
      self.env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)
    if template not in self.cache:
      self.cache[template] = self.env.from_string(template)
    try:
      return self.cache[template].render(**doc)
    except jinja2.UndefinedError as e:
      raise DataError(f"the prompt template {template!r} needs a field the row lacks ({e}); the row's fields: "
                      f"{sorted(doc)}; pick another prompt (--doc_to_text NAME or a template)") from e


render = _Renderer()


def fewshot_indices(rows: list[dict], evaluated: int, k: int, *, pool: list[dict] | None = None,
                    sampler: str = "default", seed: int = FEWSHOT_SEED, group: str | None = None) -> list[list[int]]:
  """For each of the first `evaluated` rows, the indices into `pool` (default: `rows` itself) of its `k` few-shot
  rows, drawn as lm-eval's samplers draw them. "default" is its ContextSampler: one random.Random(seed) for the
  task, drawing row after row; "first_n" its FirstNSampler. When the pool is the evaluated file (lm-eval's few-shot
  split = test split) a row's copies are never its examples: k + 1 rows are drawn and its copies dropped; from
  another pool, k rows are drawn. `group`: a field such as MMLU's subject; a row's examples come only from pool
  rows of the same value, each group with its own sampler (lm-eval runs one task per MMLU subject)."""
  if sampler not in SAMPLERS:
    raise ValueError(f"few-shot sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
  same = pool is None
  pool = rows if same else pool
  if group is not None and not all(group in r for r in rows[:evaluated] + pool):
    group = None  # not every row has it: one task over the whole file
  members, rnds, out = {}, {}, []
  for i in range(evaluated):
    key = rows[i][group] if group else None
    if key not in members:
      members[key] = [j for j in range(len(pool)) if not group or pool[j][group] == key]
      rnds[key] = random.Random(seed)
    candidates, rnd = members[key], rnds[key]
    if k == 0:
      out.append([])
      continue
    others = [j for j in candidates if not same or pool[j] != rows[i]]
    drawn_count = k + 1 if same else k
    if len(others) < k or (sampler == "default" and len(candidates) < drawn_count):
      where = f"the rows of {group} {key!r}" if group else "the few-shot rows"
      raise ValueError(f"{k} few-shot examples need {drawn_count} distinct rows in {where}; there are "
                       f"{len(others) + (1 if same else 0)}: lower --num_fewshot or give more rows")
    if sampler == "first_n":
      out.append(others[:k])
      continue
    # random.sample picks positions from the population's length alone: sampling positions picks lm-eval's rows.
    drawn = [candidates[x] for x in rnd.sample(range(len(candidates)), drawn_count)]
    if same:
      drawn = [j for j in drawn if pool[j] != rows[i]][:k]
      if len(drawn) < k:  # several copies of the row were drawn: lm-eval draws again from the others
        drawn = [others[x] for x in rnd.sample(range(len(others)), k)]
    out.append(drawn)
  return out


def build_context(prompt: Prompt, doc: dict, shots: list[dict], answers: list[str]) -> str:
  """lm-eval's plain-text `fewshot_context`: the description, then each few-shot row's text, the target delimiter,
  its answer and the few-shot delimiter, then the row's text."""
  parts = [render(prompt.description, doc)] if prompt.description else []
  for shot, answer in zip(shots, answers):
    parts.append(render(prompt.doc_to_text, shot) + prompt.target_delimiter + answer + prompt.fewshot_delimiter)
  parts.append(render(prompt.doc_to_text, doc))
  return "".join(parts)


# ----------------------------------------------------------------------------------------------------
# Metrics.

# lm-eval's gsm8k filters and exact_match settings.
STRICT_MATCH = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_EXTRACT = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORED = (",", "\\$", "(?s).*#### ", "\\.$")
INVALID = "[invalid]"
FILTERS = ("strict-match", "flexible-extract")


def strict_match(text: str) -> str:
  """The number of the first "#### N" (lm-eval's gsm8k strict-match filter), or "[invalid]"."""
  found = STRICT_MATCH.findall(text)
  return found[0].strip() if found else INVALID


def flexible_extract(text: str) -> str:
  """The last number (lm-eval's gsm8k flexible-extract filter: regex group_select -1), or "[invalid]"."""
  found = FLEXIBLE_EXTRACT.findall(text)
  if not found:
    return INVALID
  groups = [g for g in found[-1] if g]
  return groups[0].strip() if groups else INVALID


def exact_match(prediction: str, reference: str) -> bool:
  """lm-eval's gsm8k exact_match: commas, "$", everything up to "#### " and a final "." removed, case ignored."""
  for pattern in IGNORED:
    prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
  return prediction.lower() == reference.lower()


def choice_metrics(lls: list[float], choices: list[str], gold: int) -> dict:
  """acc and acc_norm of one row, as lm-eval's multiple_choice `process_results` computes them: the argmax of the
  log-likelihoods, and of the log-likelihoods over each choice's length in characters (first index on ties)."""
  pred = max(range(len(lls)), key=lambda j: (lls[j], -j))
  pred_norm = max(range(len(lls)), key=lambda j: (lls[j] / len(choices[j]), -j))
  return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold), "pred": pred, "pred_norm": pred_norm}


def mean_and_stderr(values: list[float]) -> tuple[float, float | None]:
  """The mean and lm-eval's `mean_stderr` (sample standard deviation over sqrt(n))."""
  n = len(values)
  mu = sum(values) / n
  if n < 2:
    return mu, None
  return mu, math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


# ----------------------------------------------------------------------------------------------------
# The tasks.


def generation_eos_ids(folder: str) -> list[int]:
  """The ids at which transformers' `generate` stops for a model folder (lm-eval's HF model generates with it):
  generation_config.json's eos_token_id when the file exists, else config.json's."""
  for name in ("generation_config.json", "config.json"):
    path = os.path.join(folder, name)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token_id")
      return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
  return []


def _load(model, tokenizer, dtype: str, mesh):
  """(model, tokenizer, mesh, eos ids of its generation config): a folder (or tiny:NAME) is loaded onto the FSDP
  mesh; a model object is used as it is placed, with the mesh given (or none), and no generation config."""
  import jax  # pylint: disable=import-outside-toplevel

  from jaxkd import data, models, sharding, tiny  # pylint: disable=import-outside-toplevel

  if not isinstance(model, str):
    if tokenizer is None:
      raise ValueError("a model object needs its tokenizer (or pass a model folder)")
    return model, tokenizer, mesh, []
  path = tiny.resolve(model)
  mesh = mesh or sharding.make_mesh(sharding.FSDP_MESH)
  with jax.set_mesh(mesh):
    model = models.from_pretrained(path, dtype=dtype, mesh=mesh)
  return model, tokenizer or data.load_tokenizer(path), mesh, generation_eos_ids(path)


def _prepare(task: str, data_path: str, fewshot_path: str | None, prompt: str, num_fewshot, limit,
             fewshot_sampler, seed):
  """(rows, pool rows, Prompt, the few-shot pool indices of each evaluated row, settings to report)."""
  rows = read_rows(data_path)
  pool = read_rows(fewshot_path) if fewshot_path else None
  name, p = resolve_prompt(prompt, rows[0], task)
  k = p.num_fewshot if num_fewshot is None else num_fewshot
  sampler = fewshot_sampler or p.sampler
  n = len(rows) if limit is None else min(limit, len(rows))
  shots = fewshot_indices(rows, n, k, pool=pool, sampler=sampler, seed=seed, group=p.fewshot_group)
  settings = {"prompt": name, "doc_to_text": p.doc_to_text, "num_fewshot": k, "fewshot_sampler": sampler,
              "fewshot_seed": seed, "fewshot_data": fewshot_path or data_path, "rows": n}
  return rows, rows if pool is None else pool, p, shots, settings


def multiple_choice(model, tokenizer=None, *, data_path: str, fewshot_path: str | None = None, prompt: str = "auto",
                    num_fewshot: int | None = None, limit: int | None = None, fewshot_sampler: str | None = None,
                    seed: int = FEWSHOT_SEED, batch_size: int = 32, dtype: str = "float32", mesh=None) -> dict:
  """acc and acc_norm (with lm-eval's stderr) of a model on a file of multiple-choice rows, and each row's
  context, choices, log-likelihoods and verdicts ("samples").

  `model`: an HF folder (or tiny:NAME), loaded onto the FSDP mesh of every device; or a jaxkd Transformer with its
  `tokenizer` (and the `mesh` to split batches over, or None). `fewshot_path`: the file the few-shot examples come
  from (lm-eval's few-shot split: MMLU's dev, GSM8K's train); default the evaluated file itself. `prompt`: "auto",
  a name in `PROMPTS` or a Jinja template; `num_fewshot` and `fewshot_sampler` default to the prompt's; `limit`:
  only the first N rows are evaluated (the few-shot examples still come from the whole file, as with lm-eval's
  --limit, which however counts per task: per subject for MMLU)."""
  import jax  # pylint: disable=import-outside-toplevel

  from jaxkd import loglikelihood  # pylint: disable=import-outside-toplevel

  rows, pool, p, shots, settings = _prepare("mc", data_path, fewshot_path, prompt, num_fewshot, limit,
                                            fewshot_sampler, seed)
  docs, pool_docs = [mc_doc(r) for r in rows[:settings["rows"]]], [mc_doc(r) for r in pool]
  scored_of = lambda d: list(LETTERS[:len(d["choices"])]) if p.choices == "letters" else d["choices"]
  scored = [scored_of(d) for d in docs]
  contexts = [build_context(p, d, [pool_docs[j] for j in js], [scored_of(pool_docs[j])[pool_docs[j]["gold"]]
                                                              for j in js]) for d, js in zip(docs, shots)]
  requests = [(ctx, p.target_delimiter + c) for ctx, choices in zip(contexts, scored) for c in choices]
  model, tokenizer, mesh, _ = _load(model, tokenizer, dtype, mesh)
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    results = loglikelihood.loglikelihoods(model, tokenizer, requests, batch_size=batch_size, mesh=mesh)
  samples, at = [], 0
  for i, (doc, ctx, choices) in enumerate(zip(docs, contexts, scored)):
    got = results[at:at + len(choices)]
    at += len(choices)
    lls = [ll for ll, _ in got]
    samples.append({"doc_id": i, "context": ctx, "choices": choices, "gold": doc["gold"], "loglikelihoods": lls,
                    "is_greedy": [g for _, g in got], **choice_metrics(lls, choices, doc["gold"])})
  out = {"task": "mc", **settings}
  for metric in ("acc", "acc_norm"):
    out[metric], out[f"{metric}_stderr"] = mean_and_stderr([s[metric] for s in samples])
  out["samples"] = samples
  return out


def generative(model, tokenizer=None, *, data_path: str, fewshot_path: str | None = None, prompt: str = "auto",
               num_fewshot: int | None = None, limit: int | None = None, fewshot_sampler: str | None = None,
               seed: int = FEWSHOT_SEED, until: list[str] | None = None, max_gen_toks: int = MAX_GEN_TOKS,
               batch_size: int = 32, dtype: str = "float32", mesh=None) -> dict:
  """exact_match under GSM8K's strict-match and flexible-extract filters (with lm-eval's stderr) of a model's
  greedy answers to a file of generative rows, and each row's context, generation and extractions ("samples").

  Arguments as `multiple_choice`'s; `until`: the stop strings (default the prompt's: GSM8K's "Question:", "</s>",
  "<|im_end|>"), to which the tokenizer's EOS text is added; `max_gen_toks`: tokens generated at most. The
  generation is greedy over the whole output head (as transformers' is) and stops where transformers' would under
  lm-eval: at an eos id of the folder's generation config (`generation_eos_ids`; none for a model object), at a
  token that is a stop string by itself, or after the tokens a stop string is encoded as; the text, decoded without
  special tokens, is then cut before the first stop string, as lm-eval cuts it (which stopping early never changes:
  the text generated so far already holds that stop string)."""
  import jax  # pylint: disable=import-outside-toplevel

  from jaxkd import generate, loglikelihood, sharding  # pylint: disable=import-outside-toplevel

  rows, pool, p, shots, settings = _prepare("gen", data_path, fewshot_path, prompt, num_fewshot, limit,
                                            fewshot_sampler, seed)
  n = settings["rows"]
  targets = [gen_target(r) for r in rows[:n]]
  contexts = [build_context(p, rows[i], [pool[j] for j in shots[i]], [gen_target(pool[j]) for j in shots[i]])
              for i in range(n)]
  model, tokenizer, mesh, eos_ids = _load(model, tokenizer, dtype, mesh)
  stops = list(p.until if until is None else until)
  eos_text = tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False)
  if eos_text not in stops:
    stops.append(eos_text)
  stop_ids, stop_seqs = set(eos_ids), set()
  for s in stops:  # text that holds a stop string is cut there anyway: stop generating once it is written
    ids = tokenizer(s, add_special_tokens=False)["input_ids"]
    if len(ids) == 1 and tokenizer.decode(ids) == s:
      stop_ids.add(ids[0])
    elif len(ids) > 1 and s in tokenizer.decode(ids):  # the string's own tokens ("Question", ":"); written with
      stop_seqs.add(tuple(ids))  # other tokens, it is still cut below, after generating to max_gen_toks
  max_ctx = model.cfg.max_position_embeddings - max_gen_toks
  if max_ctx <= 0:
    raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for a prompt in the model's "
                     f"max_position_embeddings={model.cfg.max_position_embeddings}; lower --max_gen_toks")
  bos = tokenizer.bos_token
  prompts = [tokenizer(c, add_special_tokens=not (bos and c.startswith(bos)))["input_ids"][-max_ctx:]
             for c in contexts]  # lm-eval's tok_batch_encode, cut from the left
  shards = sharding.batch_shards(mesh) if mesh is not None else 1
  b = -(-max(1, min(batch_size, n)) // shards) * shards
  order = sorted(range(n), key=lambda i: -len(prompts[i]))
  texts = {}
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    for lo in range(0, n, b):
      picked = order[lo:lo + b]
      pad_to = min(loglikelihood.bucket(len(prompts[picked[0]])), max_ctx)
      outs = generate.generate(model, [prompts[i] for i in picked], max_new_tokens=max_gen_toks,
                               eos_ids=sorted(stop_ids), pad_to=pad_to, rows=b, stop_seqs=sorted(stop_seqs))
      for i, out in zip(picked, outs):
        text = tokenizer.decode(out, skip_special_tokens=True)
        for s in stops:  # lm-eval's postprocess_generated_text
          if s:
            text = text.split(s)[0]
        texts[i] = text
  samples = []
  for i in range(n):
    extracted = {"strict-match": strict_match(texts[i]), "flexible-extract": flexible_extract(texts[i])}
    samples.append({"doc_id": i, "context": contexts[i], "target": targets[i], "generation": texts[i],
                    "extracted": extracted,
                    "exact_match": {f: float(exact_match(extracted[f], targets[i])) for f in FILTERS}})
  out = {"task": "gen", **settings, "until": stops, "max_gen_toks": max_gen_toks, "exact_match": {},
         "exact_match_stderr": {}}
  for f in FILTERS:
    out["exact_match"][f], out["exact_match_stderr"][f] = mean_and_stderr([s["exact_match"][f] for s in samples])
  out["samples"] = samples
  return out


def summary(out: dict) -> str:
  """The figures of a `multiple_choice` or `generative` result, one a line."""
  head = (f"{out['rows']} rows, prompt {out['prompt']}, {out['num_fewshot']}-shot "
          f"({out['fewshot_sampler']} sampler)")
  fmt = lambda v, e: f"{v:.4f}" + (f" ± {e:.4f}" if e is not None else "")
  if out["task"] == "mc":
    lines = [f"{m:>28}: {fmt(out[m], out[m + '_stderr'])}" for m in ("acc", "acc_norm")]
  else:
    lines = [f"{'exact_match ' + f:>28}: {fmt(out['exact_match'][f], out['exact_match_stderr'][f])}"
             for f in FILTERS]
  return "\n".join([head, *lines])
