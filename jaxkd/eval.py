"""Held-out evaluation of an exported model: loss, perplexity, token accuracy, agreement with a teacher; or
the share of checkable questions it answers right.

  python -m jaxkd.eval --model workdir/tiny_logit/export --data held_out.jsonl [--teacher DIR]
  python -m jaxkd.eval --task answers --model workdir/tiny_logit/export [--data FILE] [--limit 64]
  python -m jaxkd.eval --task function_calling --model DIR [--data FILE] [--chat_template NAME] [--limit 64]
  python -m jaxkd.eval --task mc --model DIR --data mmlu.jsonl [--doc_to_text mmlu] [--num_fewshot 5]
  python -m jaxkd.eval --task gen --model DIR --data gsm8k.jsonl [--num_fewshot 5] [--limit 100]

--task loss: the data file (any format the training pipeline reads) is rendered with the model's chat
template and scored on the tokens training would train on (assistant turns by default); every row is used
once. --task answers: the model answers greedily every question of the data whose answer can be checked
(`jaxkd.answers`: arithmetic, follow-ups, synonyms, lists, tool calls and their answers; stories are not
scored), by default the bundled chats' held-out rows. --task function_calling: the model writes every assistant
turn of the data's tool conversations (OpenAI layout, xLAM, Glaive; by default the bundled chats' held-out
ones that call tools), and its calls are checked as the Berkeley Function Calling Leaderboard's AST checker
does (`jaxkd.function_calling`). --task mc / gen: a local JSONL benchmark file scored as lm-evaluation-harness
scores it (multiple-choice acc and acc_norm; GSM8K-style exact_match), see jaxkd/benchmarks.py for the row
layouts and prompts.
"""

import json

from absl import app, flags
from absl import logging as absl_logging

TASKS = ("loss", "answers", "function_calling", "mc", "gen")
flags.DEFINE_enum("task", "loss", TASKS, "loss: held-out loss and token metrics; answers: the share of checkable "
                  "questions answered right by greedy generation; function_calling: the share of tool-calling "
                  "turns whose calls are right (BFCL's AST check); mc: multiple-choice acc / acc_norm; gen: "
                  "GSM8K-style exact_match.")
flags.DEFINE_string("model", None, "An HF model folder (e.g. workdir/RUN/export).", required=True)
flags.DEFINE_multi_string("data", None, "Data file(s) or hub dataset name(s); --task answers and "
                          "function_calling default to the bundled chats' held-out rows.")
flags.DEFINE_string("teacher", None, "Optional teacher folder: adds agreement, KL and the teacher's loss.")
flags.DEFINE_string("format", "auto", "Data format: auto, sharegpt, messages, alpaca, prompt_completion, text.")
flags.DEFINE_string("split", "train", "The split of the data files to score.")
flags.DEFINE_integer("seq_len", 1024, "Tokens per packed row.")
flags.DEFINE_integer("batch_size", None, "Rows per batch (--task loss, default 8; --task mc, default 32) or "
                     "prompts per generated batch (--task answers, function_calling, gen: default 32).")
flags.DEFINE_integer("max_new_tokens", 64, "--task answers, function_calling: tokens generated per answer at most.")
flags.DEFINE_integer("limit", None, "--task answers, function_calling, mc, gen: only the first N questions (turns, "
                     "rows).")
flags.DEFINE_string("doc_to_text", "auto", "--task mc/gen: the prompt, a name in jaxkd.benchmarks.PROMPTS (mmlu, "
                    "mmlu_pro, arc, hellaswag, query, bbh, gsm8k), 'auto' (by the rows' layout) or a Jinja template "
                    "over a row's fields, as in lm-eval's task YAML.")
flags.DEFINE_string("fewshot_data", None, "--task mc/gen: the JSONL file few-shot examples come from (lm-eval's "
                    "few-shot split: MMLU's dev, GSM8K's train); default the --data file (never the row itself).")
flags.DEFINE_integer("num_fewshot", None, "--task mc/gen: few-shot examples from the file (default: the prompt's).")
flags.DEFINE_enum("fewshot_sampler", None, ["default", "first_n"], "--task mc/gen: lm-eval's few-shot sampler "
                  "(default: the prompt's).")
flags.DEFINE_multi_string("until", None, "--task gen: stop strings (default GSM8K's: Question:, </s>, <|im_end|>).")
flags.DEFINE_integer("max_gen_toks", 256, "--task gen: tokens generated at most (lm-eval's default).")
flags.DEFINE_float("temperature", 1.0, "Temperature of the reported KD divergence.")
flags.DEFINE_string("dtype", "float32", "Parameter and compute dtype: float32 or bfloat16.")
flags.DEFINE_string("output", None, "Also write the metrics as JSON here.")
flags.DEFINE_string("chat_template", None, "--task function_calling: the chat template (a data.chat_template "
                    "name such as chatml_tools, or Jinja); default the tokenizer's own.")


def evaluate(model_path, data_paths, *, teacher_path=None, fmt="auto", split="train", seq_len=1024,
             batch_size=8, temperature=1.0, dtype="float32") -> dict:
  # Imported here so --help is fast.
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from jaxkd import config_base, data, models, sharding, signals  # pylint: disable=import-outside-toplevel
  from jaxkd import step as step_lib  # pylint: disable=import-outside-toplevel

  mesh = sharding.make_mesh(sharding.FSDP_MESH)
  tokenizer = data.load_tokenizer(model_path)
  with jax.set_mesh(mesh):
    student = models.from_pretrained(model_path, dtype=dtype, mesh=mesh)
    teacher = models.from_pretrained(teacher_path, dtype=dtype, mesh=mesh) if teacher_path else None
  if teacher is not None and not data.same_tokenizer(tokenizer, data.load_tokenizer(teacher_path)):
    raise ValueError(f"{teacher_path} has another tokenizer than {model_path}: token-level agreement and KL "
                     "need a shared tokenizer; evaluate without --teacher")
  for name, model in (("model", student), ("teacher", teacher)):
    problem = model and model.cfg.too_long(seq_len, what=f"--seq_len {seq_len}", name=name, fix="lower --seq_len")
    if problem:
      raise ValueError(problem)
  cfg = data.default_data_config()
  cfg.sources = [dict(path=p, eval_split=split) for p in data_paths]
  cfg.format = fmt
  loader = data.make_loader(cfg, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size, seed=0, split="eval")
  run_cfg = config_base.base_config()  # the loss settings a run would use, but for these two
  run_cfg.distill.temperature = temperature
  if teacher is None:
    run_cfg.distill.alpha = 0.0
  lc = step_lib.loss_config(run_cfg, vocab_size=len(tokenizer))
  s_def, s_state = nnx.split(student)
  t_def, t_params = (nnx.split(teacher)[0], nnx.to_pure_dict(nnx.state(teacher))) if teacher else (None, None)
  eval_step = step_lib.make_eval_step(s_def, signals.online(t_def), lc)

  def batches():
    for local in loader:
      yield data.global_batch({k: local[k] for k in step_lib.STUDENT_KEYS}, mesh)

  with jax.set_mesh(mesh):
    out = step_lib.evaluate(eval_step, {"student": nnx.to_pure_dict(s_state)}, t_params, batches(), lc)
  if out is None:
    raise ValueError(f"no trainable tokens in {data_paths}: check --format and that rows have assistant turns")
  return out


PROMPT_BUCKET = 32  # prompts are left-padded to a multiple of this: the decode loop compiles once per bucket


def answers_accuracy(model, tokenizer=None, *, data_paths=None, fmt="auto", split="train", max_new_tokens=64,
                     batch_size=32, limit=None, dtype="float32") -> dict:
  """The share of checkable held-out questions (`jaxkd.answers`) a model answers right, greedily.

  `model`: an HF folder (or tiny:NAME), or a jaxkd Transformer with its `tokenizer`. The questions come from
  every row of `data_paths`' `split`, or by default from the bundled chats' held-out rows (the rows every tiny
  config holds out). Each prompt is rendered with the tokenizer's chat template. Returns `answers.score`'s
  dict (accuracy overall and per category, skipped turns by reason; prompts too long for the model with
  max_new_tokens are skipped as "too_long") plus "answers": each question's category, prompt, reply and
  verdict."""
  # Imported here so --help is fast.
  from jaxkd import answers, data, generate  # pylint: disable=import-outside-toplevel

  model, tokenizer = _model_and_tokenizer(model, tokenizer, dtype, "answers_accuracy")
  found = answers.all_questions(data.held_out_conversations(_held_out_data(data_paths, fmt, split)), limit=limit)
  outs = greedy_replies(model, tokenizer, [generate.encode_messages(tokenizer, q.messages) for q in found.questions],
                        max_new_tokens=max_new_tokens, batch_size=batch_size)
  fits = [i for i, x in enumerate(outs) if x is not None]
  found.skipped["too_long"] += len(outs) - len(fits)
  asked = [found.questions[i] for i in fits]
  if not asked:
    raise ValueError(f"no checkable question in {data_paths or 'the bundled held-out rows'}: --task answers "
                     "needs chats in the grammar of jaxkd/data/synthetic.py (skipped: "
                     f"{dict(found.skipped)})")
  said = [tokenizer.decode(outs[i], skip_special_tokens=True).strip() for i in fits]
  out = answers.score(asked, said, found.skipped)
  out["answers"] = [{"category": q.category, "prompt": q.messages[-1]["content"], "reply": r,
                     "reference": q.reference, "right": bool(q.check(r))} for q, r in zip(asked, said)]
  return out


def _model_and_tokenizer(model, tokenizer, dtype, caller):
  from jaxkd import data, models, tiny  # pylint: disable=import-outside-toplevel

  if isinstance(model, str):
    path = tiny.resolve(model)
    return models.from_pretrained(path, dtype=dtype), data.load_tokenizer(path)
  if tokenizer is None:
    raise ValueError(f"{caller}(model, tokenizer): a model object needs its tokenizer (or pass a folder)")
  return model, tokenizer


def _held_out_data(data_paths, fmt, split):
  """The data config whose held-out rows a generation task reads: every row of `split` of `data_paths`, or by
  default the bundled chats' held-out rows (the rows every tiny config holds out)."""
  from jaxkd import config_base, data  # pylint: disable=import-outside-toplevel

  if not data_paths:
    return config_base.tiny_defaults(config_base.base_config()).data
  cfg = data.default_data_config()
  cfg.sources = [dict(path=p, eval_split=split) for p in data_paths]  # every row of that split
  cfg.format = fmt
  return cfg


def greedy_replies(model, tokenizer, prompts: list[list[int] | None], *, max_new_tokens: int,
                   batch_size: int) -> list[list[int] | None]:
  """Each prompt's greedy reply (new token ids, ending with the end token when one came), or None for a prompt
  too long for the model with max_new_tokens (and for a prompt given as None). Prompts of similar lengths are
  batched together, `batch_size` rows a batch, each padded to a multiple of PROMPT_BUCKET tokens: one compiled
  decode loop serves them all."""
  from jaxkd import generate  # pylint: disable=import-outside-toplevel

  fits = [i for i, x in enumerate(prompts) if x is not None and not model.cfg.too_long(
      len(x) + max_new_tokens, what="prompt + max_new_tokens", name="model", fix="lower max_new_tokens")]
  order = sorted(fits, key=lambda i: len(prompts[i]))  # similar lengths together: less padding
  b = max(1, min(batch_size, len(order)))
  eos_ids = generate.eos_ids_of(tokenizer)
  replies: list[list[int] | None] = [None] * len(prompts)
  for lo in range(0, len(order), b):  # every batch b rows, prompts padded to a bucket: few compiles
    rows = order[lo:lo + b]
    outs = generate.generate(model, [prompts[i] for i in rows], max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                             vocab_size=len(tokenizer), pad_to=PROMPT_BUCKET, rows=b)
    for i, out in zip(rows, outs):
      replies[i] = out
  return replies


def function_calling_accuracy(model, tokenizer=None, *, data_paths=None, fmt="auto", split="train",
                              chat_template=None, max_new_tokens=64, batch_size=32, limit=None,
                              dtype="float32") -> dict:
  """The share of tool-calling turns whose calls a model gets right, greedily (`jaxkd.function_calling`).

  `model`: an HF folder (or tiny:NAME), or a jaxkd Transformer with its `tokenizer`. Every assistant turn of the
  conversations that offer tools is written by the model after the conversation before it, rendered with
  `tools` by the chat template (`chat_template`: a data.chat_template name or Jinja; None: the tokenizer's own)
  as training renders it; its calls are read in the syntax that template writes and checked as BFCL does. The
  conversations are every row of `data_paths`' `split`, or by default the bundled chats' held-out rows that
  call tools, in the OpenAI layout (the tiny models read them with chat_template="chatml_bundled_tools").
  Returns `function_calling.score`'s dict (accuracy overall and per category, wrong turns by reason, skipped
  turns by reason) plus "syntax" and "turns": each turn's category, expected and produced calls, reply and
  verdict."""
  # Imported here so --help is fast.
  from jaxkd import data, generate  # pylint: disable=import-outside-toplevel
  from jaxkd import function_calling as fc  # pylint: disable=import-outside-toplevel
  from jaxkd.data import encode  # pylint: disable=import-outside-toplevel

  model, tokenizer = _model_and_tokenizer(model, tokenizer, dtype, "function_calling_accuracy")
  side = encode.Side(tokenizer, encode.resolve_template(chat_template, tokenizer))
  syntax = fc.syntax_of(side)
  if data_paths:
    conversations = data.held_out_examples(_held_out_data(data_paths, fmt, split))
  else:
    conversations = filter(None, map(fc.from_bundled, data.held_out_conversations(_held_out_data(None, fmt, split))))
  found = fc.turns(conversations, limit=limit)
  prompts = fc.prompt_ids(side, found.turns)  # None where the template refuses the conversation
  outs = greedy_replies(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
  found.skipped["template_error"] += sum(p is None for p in prompts)
  found.skipped["too_long"] += sum(p is not None and o is None for p, o in zip(prompts, outs))
  kept = [i for i, o in enumerate(outs) if o is not None]
  if not kept:
    raise ValueError(f"no tool-calling turn to score in {data_paths or 'the bundled held-out rows'} (skipped: "
                     f"{dict(+found.skipped)}): --task function_calling needs conversations with `tools`")
  eos_ids = generate.eos_ids_of(tokenizer)
  return fc.report([found.turns[i] for i in kept], [fc.reply_text(tokenizer, outs[i], eos_ids) for i in kept],
                   syntax, found.skipped)


def print_function_calling(out: dict) -> None:
  calls = out["calls"]
  print(f"{'turns right':>20}: {out['accuracy']:.4f} ({out['correct']} of {out['total']}; {out['syntax']} call syntax)")
  print(f"{'calls right':>20}: {calls['accuracy']:.4f} ({calls['correct']} of {calls['total']} turns that call)")
  for name, c in out["categories"].items():
    print(f"{name:>20}: {c['accuracy']:.4f} ({c['correct']} of {c['total']})")
  if out["errors"]:
    print(f"{'wrong':>20}: " + ", ".join(f"{n} {reason}" for reason, n in out["errors"].items()))
  if out["skipped"]:
    print(f"{'not scored':>20}: " + ", ".join(f"{n} {reason}" for reason, n in out["skipped"].items()))


def print_answers(out: dict) -> None:
  print(f"{'answers right':>20}: {out['accuracy']:.4f} ({out['correct']} of {out['total']})")
  for name, c in out["categories"].items():
    print(f"{name:>20}: {c['accuracy']:.4f} ({c['correct']} of {c['total']})")
  skipped = out["skipped"]
  print(f"{'not scored':>20}: {skipped.get('story', 0)} stories (no single right answer), "
        + ", ".join(f"{n} {reason}" for reason, n in skipped.items() if reason != "story"))


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # JAX and datasets log their start-up at INFO
  f = flags.FLAGS
  if f.task != "loss" and f.teacher:
    raise app.UsageError(f"--teacher is for --task loss; run --task {f.task} once per model")
  if f.task in ("mc", "gen"):
    from jaxkd import benchmarks  # pylint: disable=import-outside-toplevel
    if not f.data or len(f.data) != 1:
      raise app.UsageError(f"--task {f.task} takes one --data JSONL file")
    common = dict(data_path=f.data[0], fewshot_path=f.fewshot_data, prompt=f.doc_to_text, num_fewshot=f.num_fewshot,
                  limit=f.limit, fewshot_sampler=f.fewshot_sampler, batch_size=f.batch_size or 32, dtype=f.dtype)
    out = (benchmarks.multiple_choice(f.model, **common) if f.task == "mc" else
           benchmarks.generative(f.model, until=f.until, max_gen_toks=f.max_gen_toks, **common))
    print(benchmarks.summary(out))
  elif f.task == "function_calling":
    out = function_calling_accuracy(f.model, data_paths=f.data, fmt=f.format, split=f.split,
                                    chat_template=f.chat_template, max_new_tokens=f.max_new_tokens,
                                    batch_size=f.batch_size or 32, limit=f.limit, dtype=f.dtype)
    print_function_calling(out)
  elif f.task == "answers":
    out = answers_accuracy(f.model, data_paths=f.data, fmt=f.format, split=f.split,
                           max_new_tokens=f.max_new_tokens, batch_size=f.batch_size or 32, limit=f.limit,
                           dtype=f.dtype)
    print_answers(out)
  else:
    if not f.data:
      raise app.UsageError("--task loss needs --data (the held-out file(s) to score)")
    out = evaluate(f.model, f.data, teacher_path=f.teacher, fmt=f.format, split=f.split, seq_len=f.seq_len,
                   batch_size=f.batch_size or 8, temperature=f.temperature, dtype=f.dtype)
    names = {"loss": "held-out loss", "perplexity": "perplexity", "accuracy": "token accuracy",
             "tokens": "tokens scored", "agreement": "top-1 agreement with teacher",
             "kl_t1": "KL(teacher || student)", "teacher_ce": "teacher loss"}
    for key, name in names.items():
      if key in out:
        print(f"{name:>30}: {out[key]:.0f}" if key == "tokens" else f"{name:>30}: {out[key]:.4f}")
  if f.output:
    with open(f.output, "w") as fh:
      json.dump(out, fh, indent=2)


if __name__ == "__main__":
  app.run(main)
