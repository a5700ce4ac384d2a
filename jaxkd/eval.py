"""Held-out evaluation of an exported model: loss, perplexity, token accuracy, agreement with a teacher; or
the share of checkable questions it answers right.

  python -m jaxkd.eval --model workdir/tiny_logit/export --data held_out.jsonl [--teacher DIR]
  python -m jaxkd.eval --task answers --model workdir/tiny_logit/export [--data FILE] [--limit 64]

--task loss: the data file (any format the training pipeline reads) is rendered with the model's chat
template and scored on the tokens training would train on (assistant turns by default); every row is used
once. --task answers: the model answers greedily every question of the data whose answer can be checked
(`jaxkd.answers`: arithmetic, follow-ups, synonyms, lists, tool calls and their answers; stories are not
scored), by default the bundled chats' held-out rows.
"""

import json

from absl import app, flags
from absl import logging as absl_logging

TASKS = ("loss", "answers")
flags.DEFINE_enum("task", "loss", TASKS, "loss: held-out loss and token metrics; answers: the share of checkable "
                  "questions answered right by greedy generation.")
flags.DEFINE_string("model", None, "An HF model folder (e.g. workdir/RUN/export).", required=True)
flags.DEFINE_multi_string("data", None, "Data file(s) or hub dataset name(s); --task answers defaults to the "
                          "bundled chats' held-out rows.")
flags.DEFINE_string("teacher", None, "Optional teacher folder: adds agreement, KL and the teacher's loss.")
flags.DEFINE_string("format", "auto", "Data format: auto, sharegpt, messages, alpaca, prompt_completion, text.")
flags.DEFINE_string("split", "train", "The split of the data files to score.")
flags.DEFINE_integer("seq_len", 1024, "Tokens per packed row.")
flags.DEFINE_integer("batch_size", None, "Rows per batch (--task loss, default 8) or prompts per generated batch "
                     "(--task answers, default 32).")
flags.DEFINE_integer("max_new_tokens", 64, "--task answers: tokens generated per answer at most.")
flags.DEFINE_integer("limit", None, "--task answers: only the first N questions.")
flags.DEFINE_float("temperature", 1.0, "Temperature of the reported KD divergence.")
flags.DEFINE_string("dtype", "float32", "Parameter and compute dtype: float32 or bfloat16.")
flags.DEFINE_string("output", None, "Also write the metrics as JSON here.")


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
  from jaxkd import answers, config_base, data, generate, models, tiny  # pylint: disable=import-outside-toplevel

  if isinstance(model, str):
    path = tiny.resolve(model)
    model, tokenizer = models.from_pretrained(path, dtype=dtype), data.load_tokenizer(path)
  elif tokenizer is None:
    raise ValueError("answers_accuracy(model, tokenizer): a model object needs its tokenizer (or pass a folder)")
  if data_paths:
    cfg = data.default_data_config()
    cfg.sources = [dict(path=p, eval_split=split) for p in data_paths]  # every row of that split
    cfg.format = fmt
  else:
    cfg = config_base.tiny_defaults(config_base.base_config()).data
  found = answers.all_questions(data.held_out_conversations(cfg), limit=limit)
  ids = [generate.encode_messages(tokenizer, q.messages) for q in found.questions]
  fits = [i for i, x in enumerate(ids) if not model.cfg.too_long(
      len(x) + max_new_tokens, what="prompt + max_new_tokens", name="model", fix="lower max_new_tokens")]
  found.skipped["too_long"] += len(ids) - len(fits)
  asked = [found.questions[i] for i in fits]
  if not asked:
    raise ValueError(f"no checkable question in {data_paths or 'the bundled held-out rows'}: --task answers "
                     "needs chats in the grammar of jaxkd/data/synthetic.py (skipped: "
                     f"{dict(found.skipped)})")
  order = sorted(fits, key=lambda i: len(ids[i]))  # similar lengths together: less padding
  b = min(batch_size, len(order))
  eos_ids = generate.eos_ids_of(tokenizer)
  replies = {}
  for lo in range(0, len(order), b):  # every batch b rows, prompts padded to a bucket: few compiles
    rows = order[lo:lo + b]
    outs = generate.generate(model, [ids[i] for i in rows], max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                             vocab_size=len(tokenizer), pad_to=PROMPT_BUCKET, rows=b)
    for i, out in zip(rows, outs):
      replies[i] = tokenizer.decode(out, skip_special_tokens=True).strip()
  said = [replies[i] for i in fits]
  out = answers.score(asked, said, found.skipped)
  out["answers"] = [{"category": q.category, "prompt": q.messages[-1]["content"], "reply": r,
                     "reference": q.reference, "right": bool(q.check(r))} for q, r in zip(asked, said)]
  return out


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
  if f.task == "answers":
    if f.teacher:
      raise app.UsageError("--teacher is for --task loss; run --task answers once per model")
    out = answers_accuracy(f.model, data_paths=f.data, fmt=f.format, split=f.split,
                           max_new_tokens=f.max_new_tokens, batch_size=f.batch_size or 32, limit=f.limit,
                           dtype=f.dtype)
    print_answers(out)
    if f.output:
      with open(f.output, "w") as fh:
        json.dump(out, fh, indent=2)
    return
  if not f.data:
    raise app.UsageError("--task loss needs --data (the held-out file(s) to score)")
  out = evaluate(f.model, f.data, teacher_path=f.teacher, fmt=f.format, split=f.split, seq_len=f.seq_len,
                 batch_size=f.batch_size or 8, temperature=f.temperature, dtype=f.dtype)
  names = {"loss": "held-out loss", "perplexity": "perplexity", "accuracy": "token accuracy",
           "tokens": "tokens scored", "agreement": "top-1 agreement with teacher", "kl_t1": "KL(teacher || student)",
           "teacher_ce": "teacher loss"}
  for key, name in names.items():
    if key in out:
      print(f"{name:>30}: {out[key]:.0f}" if key == "tokens" else f"{name:>30}: {out[key]:.4f}")
  if f.output:
    with open(f.output, "w") as fh:
      json.dump(out, fh, indent=2)


if __name__ == "__main__":
  app.run(main)
