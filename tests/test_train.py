"""End to end: the command on the tiny config, exact resume, and start-of-run config errors."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import transformers as tf

from jaxkd import config_base, data, models, tiny, trainer
from jaxkd import workdir as workdir_lib
from tests.runs import ROOT, command, load_config


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_tiny_logit_command_trains_and_exports(tmp_path):
  workdir = str(tmp_path / "run")
  out = subprocess.run(command(workdir, steps=16, checkpoint_every=8), capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "exported student" in out.stdout and "held-out: loss" in out.stdout
  # What it prints is the run's: the final evaluation (the last line of metrics.jsonl) and the export folder.
  final = _metrics(workdir)[-1]
  assert final["step"] == 16 and f"held-out: loss {final['eval_loss']:.4f}, token accuracy " in out.stdout
  assert f"exported student: {os.path.join(workdir, 'export')}" in out.stdout.splitlines()
  assert out.stdout.count("\n  student:   ") == 3 and out.stdout.count("\n  teacher:   ") == 3  # closing samples
  steps = [m for m in _metrics(workdir) if "loss" in m]
  assert [m["step"] for m in steps] == list(range(1, 17))
  for m in steps:
    assert {"loss", "kd", "ce", "grad_norm", "lr", "tokens", "tokens_per_s"} <= set(m)
  first, last = np.mean([m["loss"] for m in steps[:3]]), np.mean([m["loss"] for m in steps[-3:]])
  assert last < 0.9 * first, (first, last)
  # The export loads in transformers, with the logits jaxkd computes from it.
  export = os.path.join(workdir, "export")
  model, info = tf.AutoModelForCausalLM.from_pretrained(export, output_loading_info=True, dtype=torch.float32)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  # The export's tokenizer is the student's: the same chat template, the same ids (loaded as a user would).
  exported, student = tf.AutoTokenizer.from_pretrained(export), data.load_tokenizer(tiny.resolve("tiny:student"))
  chat = [{"role": "user", "content": "What is 4 plus 9?"}, {"role": "assistant", "content": "It is 13."}]
  rendered = student.apply_chat_template(chat, tokenize=False)
  assert exported.chat_template and exported.apply_chat_template(chat, tokenize=False) == rendered
  want = student(rendered, add_special_tokens=False)["input_ids"]
  assert exported(rendered, add_special_tokens=False)["input_ids"] == want and len(want) > 10
  ids = np.random.RandomState(0).randint(0, 700, (1, 20)).astype(np.int32)
  with torch.no_grad():
    ref = model.eval()(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(models.from_pretrained(export, dtype="float32")(ids))
  np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_resume_is_exact(tmp_path):
  """A run resumed from an earlier checkpoint logs the same losses and exports the same student."""
  workdir = str(tmp_path / "run")
  cfg = load_config(**{"workdir": workdir, "steps": 9, "checkpoint_every": 3, "export.dtype": "float32"})
  trainer.run(cfg)
  first = [m for m in _metrics(workdir) if "loss" in m]
  with open(os.path.join(workdir, "export", "model.safetensors"), "rb") as f:
    exported = f.read()
  # Forget the last two checkpoints: the rerun resumes from step 3 and redoes 4..9.
  for step in ("6", "9"):
    shutil.rmtree(os.path.join(workdir, "checkpoints", step))
  trainer.run(load_config(**{"workdir": workdir, "steps": 9, "checkpoint_every": 3, "export.dtype": "float32"}))
  again = [m for m in _metrics(workdir) if "loss" in m]
  assert [m["step"] for m in again] == list(range(1, 10))
  for a, b in zip(first, again):
    for key in ("loss", "kd", "ce", "grad_norm", "lr", "tokens"):
      assert a[key] == b[key], (a["step"], key, a[key], b[key])
  with open(os.path.join(workdir, "export", "model.safetensors"), "rb") as f:
    assert f.read() == exported


def test_attention_and_remat_settings_reach_both_models(tmp_path):
  overrides = {"workdir": str(tmp_path / "run"), "student.attention": "xla", "teacher.attention": "xla",
               "student.remat": "full"}
  run = trainer.Run(load_config(**overrides))
  assert (run.student.attention, run.teacher.attention, run.student.remat) == ("xla", "xla", "full")
  # They say how, not what, is computed: a run may resume under other values (another chip, less memory).
  assert not workdir_lib.config_diff(workdir_lib.config_dict(load_config()), workdir_lib.config_dict(run.config))


def test_sequence_longer_than_the_model_is_refused(tmp_path):
  cfg = load_config(**{"workdir": str(tmp_path / "run"), "data.seq_len": 4096})
  with pytest.raises(config_base.ConfigError, match=r"data\.seq_len=4096 is longer than the student's "
                                                    r"max_position_embeddings=2048"):
    trainer.Run(cfg)


def test_different_tokenizers_refuse_logit_distillation(tmp_path):
  from tokenizers import Tokenizer, models as tm, pre_tokenizers  # pylint: disable=import-outside-toplevel
  raw = Tokenizer(tm.WordLevel({f"w{i}": i for i in range(800)} | {"[UNK]": 800}, unk_token="[UNK]"))
  raw.pre_tokenizer = pre_tokenizers.Whitespace()
  other = str(tmp_path / "other_tok")
  tf.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="[UNK]").save_pretrained(other)
  cfg = load_config(**{"workdir": str(tmp_path / "run"), "teacher.tokenizer": other})
  with pytest.raises(config_base.ConfigError, match=r"differs from the student's.*distill\.kind=\"hidden\""):
    trainer.Run(cfg)
