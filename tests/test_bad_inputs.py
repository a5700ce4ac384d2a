"""Bad inputs, each refused with a message that names the problem and the fix; nothing already saved is lost.

| input                                                        | message (the start; tested by the test named)              |
|--------------------------------------------------------------|-------------------------------------------------------------|
| `distill.alpha=1.5`, `distill.temperature=0`, `distill.kind="kl"`, `optimizer.micro_batches=3`, `teacher.path=""` | `config.distill.alpha=1.5: must be in [0, 1]` ... (tests/test_configs.py) |
| `nonfinite="maybe"`                                          | `config.nonfinite='maybe': "skip" skips a step with NaN/Inf ...` (tests/test_configs.py) |
| `checkpoint_every=0`, `steps=0`, `max_to_keep=0`             | `config.checkpoint_every=0: must be >= 1` ... (tests/test_configs.py) |
| `data.seq_len=1`, `optimizer.lr=-1.0`, `student.path=""`     | `config.data.seq_len=1: must be >= 2` ... (tests/test_configs.py) |
| `student.attention="flash"`, `teacher.attention="fast"`, `student.remat="some"` | `config.student.attention='flash': use one of auto, xla, cudnn, splash ...` (tests/test_configs.py) |
| `teacher.quantize="int4"`; `teacher.quantize="int8"` with `teacher.cache` | `config.teacher.quantize='int4': unknown; use "int8" ...`; `... quantises the teacher model, but teacher.cache loads none ...` (tests/test_quantize.py) |
| a misspelt override (`optimizer.learning_rate`)              | `config.optimizer.learning_rate: no such key ...` (tests/test_configs.py) |
| `data.batch_size=4` on 8 devices (mesh data x fsdp = 8)       | `config.data.batch_size=4 is not divisible by 8, the mesh's data x fsdp ... use a multiple of 8, or set mesh.fsdp ...` |
| teacher tokenizer larger than the teacher's vocab (cross-tokenizer) | `the teacher's tokenizer has N tokens but the teacher's vocab dim is M ...` |
| `distributed.coordinator` without `num_processes`            | `config.distributed.num_processes=0: with distributed.coordinator='127.0.0.1:1234' it must be the number of processes` (tests/test_configs.py) |
| `distributed.process_id=2` of 2                              | `config.distributed.process_id=2: must be in [0, 2)` (tests/test_configs.py) |
| `distributed.heartbeat_timeout_s=0`                          | `config.distributed.heartbeat_timeout_s=0: must be >= 1` (tests/test_configs.py) |
| `data.seq_len=4096` (longer than the model)                  | `... is longer than the student's max_position_embeddings=2048` (tests/test_train.py) |
| `student.path` a folder that does not exist                  | `model folder '...' does not exist`                         |
| `student.path` a folder without config.json                  | `... has no config.json; point to a Hugging Face model folder` |
| `student.path` with model.safetensors cut short              | `.../model.safetensors is truncated ...`                    |
| `student.path` with a weight missing                         | `...: 1 weight(s) that config.json implies are missing from the checkpoint, e.g. [...]` |
| `student.path` whose config.json does not fit the weights    | `.../model.safetensors: weight model.layers.0.mlp.down_proj.weight has shape (64, 192) but config.json implies (64, 200); ...` |
| teacher tokenizer differs from the student's (logit KD)      | `teacher tokenizer (...) differs from the student's ... distill.kind="hidden"` (tests/test_train.py) |
| dataset rows with an unknown role / an empty conversation    | skipped and counted in the loader summary (`unknown_role: 1 in ... (rows 2400)`) |
| the same rows with `data.strict=True`                        | `... row 2400: unknown_role: message 0 has role 'martian' (data.strict=True; set it False to skip and count such rows)` |
| a workdir holding a run of another config                    | `workdir ... holds a run of a different config (.../config.json): 2 setting(s) differ: distill.alpha: 0.5 there, 0.7 now; seed: ... Resume it with its own settings, use another workdir, or set overwrite=True ...` |
| the same without config.json (read from the checkpoint)      | the same message, naming `.../checkpoints/2`                |
| `steps` changed under a decaying schedule                    | `steps: 2 there, 4 now (steps is part of a run whose learning rate decays over it ...)` |
| `overwrite=True` over a run of another config                | not an error: the old run is moved to `<workdir>.replaced-<time>`, logged |
| no space left while saving (a 2.6 MB tmpfs)                  | `error: saving checkpoint step 4 into .../checkpoints failed: ... No space left on device ... The finished checkpoints [2] are intact; fix the cause ...`, exit status 1 |
| an error inside the background save (injected ENOSPC)        | the same message (tests/test_resilience.py)                 |
| checkpoints none of which restores                           | `... holds checkpoints [2, 4, 6, 8] but none of them can be restored: ...` (tests/test_resilience.py) |
| NaN/Inf under `nonfinite="stop"`                             | `step 3: the loss or gradients hold NaN or Inf ...` (tests/test_resilience.py) |
"""

import json
import os
import shutil
import subprocess

import jax
import pytest

from jaxkd import checkpoint as ckpt_lib
from jaxkd import config_base, data, models, tiny, trainer
from jaxkd import workdir as workdir_lib
from tests import hf_models, runs
from tests.runs import load_config

SHORT = {"steps": 2, "checkpoint_every": 2, "data.eval_fraction": 0.0, "progress": False}


# --------------------------------------------------------------------------------------------------------
# Weights.


def _broken_student(tmp_path, damage):
  folder = str(tmp_path / "student")
  shutil.copytree(tiny.resolve("tiny:student"), folder)
  damage(folder)
  return folder


@pytest.mark.parametrize("damage,error,match", [
    (lambda f: shutil.rmtree(f), FileNotFoundError, r"model folder '.*student' does not exist"),
    (lambda f: os.remove(os.path.join(f, "config.json")), models.WeightsError,
     r"student has no config\.json; point to a Hugging Face model folder"),
    (hf_models.truncate_weights, models.WeightsError, r"student/model\.safetensors is truncated"),
    (lambda f: hf_models.rewrite_weights(f, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
     models.WeightsError,
     r"student: 1 weight\(s\) that config\.json implies are missing from the checkpoint, e\.g\. "
     r"\['model\.layers\.1\.mlp\.up_proj\.weight'\]"),
    (lambda f: hf_models.edit_config(f, intermediate_size=200), models.WeightsError,
     r"weight model\.layers\.\d\.mlp\.(up|gate|down)_proj\.weight has shape \(\d+, \d+\) but config\.json implies"),
], ids=["missing-folder", "no-config", "truncated", "missing-weight", "wrong-shape"])
def test_a_broken_student_folder_gives_the_loaders_message(tmp_path, damage, error, match):
  folder = _broken_student(tmp_path, damage)
  # Both sides read the bundled tokenizer's folder: the tokenizers (compared before any weight is read) agree,
  # so what fails is the student's folder.
  cfg = load_config(**{"workdir": str(tmp_path / "run"), "student.path": folder,
                       "student.tokenizer": data.TOKENIZER_DIR, "teacher.tokenizer": data.TOKENIZER_DIR})
  with pytest.raises(error, match=match):
    trainer.Run(cfg)


def test_a_batch_the_mesh_cannot_split_is_named(tmp_path):
  assert len(jax.devices()) == 8  # conftest: 8 simulated CPU devices, all on fsdp by default
  with pytest.raises(config_base.ConfigError, match=r"config\.data\.batch_size=4 is not divisible by 8, the mesh's "
                                                    r"data x fsdp .* use a multiple of 8, or set mesh\.fsdp"):
    trainer.Run(load_config(**{"workdir": str(tmp_path / "run"), "data.batch_size": 4}))
  trainer.Run(load_config(**{"workdir": str(tmp_path / "run2"), "data.batch_size": 4, "mesh.fsdp": 2,
                             "mesh.data": 1, "mesh.tensor": 4}))  # split 2 ways: accepted


def test_a_teacher_tokenizer_larger_than_the_teachers_vocab_is_named(tmp_path):
  from jaxkd.data.synthetic import make_conversations, tokenizer_corpus, train_tokenizer  # pylint: disable=import-outside-toplevel
  folder = str(tmp_path / "tok640")
  train_tokenizer(tokenizer_corpus(make_conversations(3, 400)), vocab_size=640).save_pretrained(folder)
  cfg = load_config("tiny_cross_tokenizer", **{"workdir": str(tmp_path / "run"), "teacher.tokenizer": folder})
  with pytest.raises(config_base.ConfigError, match=r"the teacher's tokenizer has 640 tokens but the teacher's vocab "
                                                    r"dim is 576; config\.teacher\.tokenizer does not belong"):
    trainer.Run(cfg)


# --------------------------------------------------------------------------------------------------------
# Data rows.


def _rows_with_bad_ones(tmp_path) -> str:
  path = str(tmp_path / "chats.jsonl")
  shutil.copy(data.CHAT_SHAREGPT, path)
  with open(data.CHAT_SHAREGPT) as f:
    n = sum(1 for _ in f)
  assert n == 2400
  with open(path, "a") as f:
    f.write(json.dumps({"conversations": [{"from": "martian", "value": "hi"}, {"from": "gpt", "value": "x"}]}) + "\n")
    f.write(json.dumps({"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}) + "\n")
  return path


def test_malformed_rows_are_skipped_and_counted_or_named_under_strict(tmp_path):
  sources = [dict(path=_rows_with_bad_ones(tmp_path))]
  run = trainer.Run(load_config(**{"workdir": str(tmp_path / "run"), "data.sources": sources,
                                   "data.eval_fraction": 0.0}))
  skipped = run.loader.stats["skipped"]
  assert skipped == {"unknown_role": 1, "missing_field": 1}, skipped
  summary = run.loader.summary()
  assert "unknown_role: 1 in" in summary and "(rows 2400)" in summary and "(rows 2401)" in summary
  with pytest.raises(data.DataError, match=r"chats\.jsonl row 2400: unknown_role: message 0 has role 'martian' "
                                           r"\(data\.strict=True; set it False to skip and count such rows\)"):
    trainer.Run(load_config(**{"workdir": str(tmp_path / "strict"), "data.sources": sources,
                               "data.eval_fraction": 0.0, "data.strict": True}))


# --------------------------------------------------------------------------------------------------------
# A workdir that holds another run.


def _files(folder):
  out = {}
  for root, _, names in os.walk(folder):
    for n in names:
      p = os.path.join(root, n)
      out[os.path.relpath(p, folder)] = os.path.getsize(p)
  return out


def test_a_workdir_of_another_config_is_refused_unless_overwrite(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  trainer.run(load_config(workdir=workdir, **SHORT))
  saved = _files(os.path.join(workdir, "checkpoints"))

  with pytest.raises(config_base.ConfigError, match=(
      rf"workdir {workdir} holds a run of a different config \({workdir}/config\.json\): 2 setting\(s\) differ: "
      r"distill\.alpha: 0\.5 there, 0\.7 now; seed: 0 there, 3 now\. Resume it with its own settings, use another "
      r"workdir, or set overwrite=True")):
    trainer.Run(load_config(workdir=workdir, **SHORT, **{"distill.alpha": 0.7, "seed": 3}))
  with pytest.raises(config_base.ConfigError, match=r"steps: 2 there, 4 now \(steps is part of a run whose learning "
                                                    r"rate decays over it"):
    trainer.Run(load_config(workdir=workdir, **dict(SHORT, steps=4)))
  # Bookkeeping may change: how often to save, log or evaluate, the mesh, the non-finite policy.
  trainer.Run(load_config(workdir=workdir, **dict(SHORT, checkpoint_every=1, log_every=5),
                          **{"mesh.fsdp": 2, "mesh.data": -1, "nonfinite": "stop"}))
  # Without config.json the checkpoint's own copy of the config decides.
  os.remove(os.path.join(workdir, "config.json"))
  with pytest.raises(config_base.ConfigError, match=rf"different config \({workdir}/checkpoints/2\): 1 setting"):
    trainer.Run(load_config(workdir=workdir, **SHORT, **{"distill.alpha": 0.7}))
  assert _files(os.path.join(workdir, "checkpoints")) == saved

  with caplog.at_level("WARNING", logger="jaxkd"):
    run = trainer.Run(load_config(workdir=workdir, overwrite=True, **SHORT, **{"distill.alpha": 0.7}))
  assert run.resume_step is None  # a fresh start...
  (aside,) = [d for d in os.listdir(tmp_path) if d.startswith("run.replaced-")]
  assert _files(os.path.join(tmp_path, aside, "checkpoints")) == saved  # ...with the old run kept whole
  assert f"was moved to {tmp_path / aside}" in caplog.text


def test_a_run_that_stopped_before_its_first_checkpoint_does_not_hold_the_workdir(tmp_path):
  """A run that failed at step 1 (NaN under nonfinite="stop", an out-of-memory) leaves config.json and no
  checkpoint: the rerun its error message advises, with other settings, starts afresh instead of being refused."""
  workdir = tmp_path / "run"
  os.makedirs(workdir / "checkpoints")
  ckpt_lib.write_json(str(workdir / "config.json"),
                      workdir_lib.config_dict(load_config(workdir=str(workdir), **SHORT, **{"optimizer.lr": 3e-3})))
  run = trainer.Run(load_config(workdir=str(workdir), **SHORT, **{"optimizer.lr": 1e-3}))
  assert run.resume_step is None


def test_steps_below_the_newest_checkpoint_are_refused(tmp_path):
  """A constant-schedule run may be extended, but not cut below a checkpoint it already holds: that would
  report and export the later step as if it were the earlier one."""
  workdir = str(tmp_path / "run")
  constant = {**SHORT, "optimizer.schedule": "constant"}
  trainer.run(load_config(workdir=workdir, **constant))
  with pytest.raises(config_base.ConfigError, match=r"config\.steps=1, but .* holds a checkpoint of step 2, past "
                                                    r"it: set steps >= 2"):
    trainer.Run(load_config(workdir=workdir, **dict(constant, steps=1)))


def test_a_run_of_an_older_jaxkd_resumes_when_the_settings_added_since_hold_their_defaults():
  """A workdir's config.json from before a setting existed (here distill.on_policy and distill.chunk_budget_mib)
  is the same run when the new settings hold their defaults, which keep what the older jaxkd did; not otherwise."""
  older = workdir_lib.config_dict(load_config())
  del older["distill"]["on_policy"], older["distill"]["chunk_budget_mib"]
  assert workdir_lib.config_diff(older, workdir_lib.config_dict(load_config())) == []
  on = workdir_lib.config_dict(load_config(**{"distill.on_policy.fraction": 0.5}))
  assert workdir_lib.config_diff(older, on) == [("distill.on_policy.fraction", None, 0.5)]
  # With no on-policy step the other sampling settings change nothing: not part of the run's identity.
  off = workdir_lib.config_dict(load_config(**{"distill.on_policy.max_new_tokens": 64}))
  assert workdir_lib.config_diff(workdir_lib.config_dict(load_config()), off) == []
  assert workdir_lib.config_diff(on, workdir_lib.config_dict(load_config(**{
      "distill.on_policy.fraction": 0.5, "distill.on_policy.max_new_tokens": 64}))) != []


def test_constant_schedule_runs_may_be_extended():
  stored = workdir_lib.config_dict(load_config(**{"optimizer.schedule": "constant", "steps": 2}))
  longer = workdir_lib.config_dict(load_config(**{"optimizer.schedule": "constant", "steps": 4}))
  assert workdir_lib.config_diff(stored, longer) == []
  decaying = workdir_lib.config_dict(load_config(steps=4))
  assert ("optimizer.schedule", "constant", "cosine") in workdir_lib.config_diff(stored, decaying)


# --------------------------------------------------------------------------------------------------------
# A full disk.


def test_no_space_left_while_saving(tmp_path):
  """A real full disk: checkpoints/ on a 2.6 MB tmpfs holds one checkpoint (1.8 MB) but not two."""
  workdir = str(tmp_path / "run")
  ck = os.path.join(workdir, "checkpoints")
  os.makedirs(ck)
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2600k", "tmpfs", ck], capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f"mounting a small tmpfs needs root ({mounted.stderr.strip()}); "
                "test_a_failed_background_save_stops_the_run covers the same path with an injected ENOSPC")
  try:
    rc, out = runs.run(runs.command(workdir, **dict(SHORT, steps=6)), str(tmp_path / "log.txt"))
    assert rc == 1, out[-3000:]
    # One line says what happened, what is intact and what to do (Orbax logs the failed writes before it).
    (line,) = [x for x in out.splitlines() if x.startswith("error: ")]
    assert (line.startswith(f"error: saving checkpoint step 4 into {ck} failed:") and "No space left on device" in line
            and "The finished checkpoints [2] are intact" in line and "resume from step 2" in line), out[-3000:]
    assert out.strip().splitlines()[-1] == line, out[-2000:]  # and it is the last thing printed
    # Checkpoint 2 is whole: its arrays match the checksums saved with them.
    with open(os.path.join(ck, "2", "meta", "metadata")) as f:
      meta = json.load(f)
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    arrays = ocp.StandardCheckpointer().restore(os.path.join(ck, "2", "state"))
    sums, nonfinite = ckpt_lib.inspect({"params": arrays["params"]})
    assert not nonfinite and sums == {k: v for k, v in meta["checksums"].items() if k.startswith("['params']")}
  finally:
    subprocess.run(["umount", ck], check=True)


@pytest.mark.parametrize("key,value,match", [
    ("data.overlong", "cut", r"config\.data\.overlong='cut': use 'truncate' or 'drop'"),
    ("data.train_on", "assistants", r"config\.data\.train_on='assistants': use 'assistant'"),
    ("data.eval_fraction", 1.5, r"config\.data\.eval_fraction=1\.5: use a fraction in \(0, 1\)"),
    ("data.sources", [{"paths": "x.jsonl"}], r"config\.data\.sources\[0\] has unknown keys \['paths'\]"),
])
def test_data_keys_are_checked_before_any_model_is_read(tmp_path, key, value, match):
  """The student's folder does not exist: the data key's error, not the missing folder's, must come first."""
  cfg = load_config(**{"workdir": str(tmp_path / "run"), "student.path": str(tmp_path / "no-such-model"),
                       key: value})
  with pytest.raises(config_base.ConfigError, match=match):
    trainer.Run(cfg)
