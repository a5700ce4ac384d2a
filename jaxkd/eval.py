"""Held-out evaluation of an exported model: loss, perplexity, token accuracy, agreement with a teacher.

  python -m jaxkd.eval --model workdir/tiny_logit/export --data held_out.jsonl [--teacher DIR]

The data file (any format the training pipeline reads) is rendered with the model's chat template and
scored on the tokens training would train on (assistant turns by default); every row is used once.
"""

import json

from absl import app, flags
from absl import logging as absl_logging

flags.DEFINE_string("model", None, "An HF model folder (e.g. workdir/RUN/export).", required=True)
flags.DEFINE_multi_string("data", None, "Data file(s) or hub dataset name(s).", required=True)
flags.DEFINE_string("teacher", None, "Optional teacher folder: adds agreement, KL and the teacher's loss.")
flags.DEFINE_string("format", "auto", "Data format: auto, sharegpt, messages, alpaca, prompt_completion, text.")
flags.DEFINE_string("split", "train", "The split of the data files to score.")
flags.DEFINE_integer("seq_len", 1024, "Tokens per packed row.")
flags.DEFINE_integer("batch_size", 8, "Rows per batch.")
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


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # JAX and datasets log their start-up at INFO
  f = flags.FLAGS
  out = evaluate(f.model, f.data, teacher_path=f.teacher, fmt=f.format, split=f.split, seq_len=f.seq_len,
                 batch_size=f.batch_size, temperature=f.temperature, dtype=f.dtype)
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
