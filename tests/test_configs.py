"""Every config file loads and passes the start-of-run checks; the hub configs fit the models they name; a bad
value or an unknown key is refused with a message that names it (tests/test_bad_inputs.py lists them all)."""

import os
import subprocess
import sys

import pytest

from jaxkd import config_base, hidden
from jaxkd.models import config_from_hf
from jaxkd.models.presets import PRESETS
from tests.runs import ROOT, load_config

CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))
HUB = ["qwen2_logit", "sft", "qwen2_hidden", "llama_to_stablelm_hidden", "llama70b_to_stablelm_hidden",
       "qwen3_logit"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_validates(name):
  c = load_config(name)
  config_base.validate(c)
  assert c.workdir.endswith(name), "each config writes to its own default workdir"


@pytest.mark.parametrize("name", HUB)
def test_hub_config_fits_the_models_it_names(name):
  assert set(HUB) <= set(CONFIGS)
  c = load_config(name)
  student = config_from_hf(PRESETS[c.student.path])
  assert c.data.seq_len <= student.max_position_embeddings
  if not c.teacher.path:
    assert c.distill.alpha == 0 and c.distill.hidden.weight == 0
    return
  teacher = config_from_hf(PRESETS[c.teacher.path])
  assert (c.data.teacher_seq_len or c.data.seq_len) <= teacher.max_position_embeddings
  if c.distill.hidden.weight > 0:
    pairs = hidden.layer_map(student.num_layers, teacher.num_layers, c.distill.hidden.layer_map)
    assert pairs[-1] == (student.num_layers, teacher.num_layers) and len(pairs) == student.num_layers
  if c.distill.kind != "hidden" and c.distill.alpha > 0:  # logit KD: one tokenizer, so one model family
    assert student.model_type == teacher.model_type


# --------------------------------------------------------------------------------------------------------
# Bad values and keys, each refused naming the key.


@pytest.mark.parametrize("key,value,match", [
    ("distill.alpha", 1.5, r"config\.distill\.alpha=1\.5: must be in \[0, 1\]"),
    ("distill.temperature", 0.0, r"config\.distill\.temperature=0\.0: must be > 0"),
    ("distill.kind", "kl", r"config\.distill\.kind='kl': unknown; use one of forward_kl"),
    ("optimizer.micro_batches", 3, r"config\.data\.batch_size=8: must be divisible by optimizer\.micro_batches=3"),
    ("teacher.path", "", r"config\.teacher\.path='': is empty"),
    ("nonfinite", "maybe", r"config\.nonfinite='maybe': \"skip\" skips a step with NaN/Inf"),
    ("checkpoint_every", 0, r"config\.checkpoint_every=0: must be >= 1"),
    ("steps", 0, r"config\.steps=0: must be >= 1"),
    ("max_to_keep", 0, r"config\.max_to_keep=0: must be >= 1"),
    ("data.seq_len", 1, r"config\.data\.seq_len=1: must be >= 2"),
    ("optimizer.lr", -1.0, r"config\.optimizer\.lr=-1\.0: must be >= 0"),
    ("student.path", "", r"config\.student\.path='': is empty"),
    ("student.attention", "flash", r"config\.student\.attention='flash': use one of auto, xla, cudnn, splash"),
    ("teacher.attention", "fast", r"config\.teacher\.attention='fast': use one of auto, xla, cudnn, splash"),
    ("student.remat", "some", r"config\.student\.remat='some': use one of dots, dots_no_batch, dots_no_batch_attention, full, none"),
    ("distributed.heartbeat_timeout_s", 0, r"config\.distributed\.heartbeat_timeout_s=0: must be >= 1"),
    # Before these were checked at start, each failed later: a ZeroDivisionError at step 1, or after training.
    ("log_every", 0, r"config\.log_every=0: must be >= 1"),
    ("eval_every", -5, r"config\.eval_every=-5: must be >= 0"),
    ("export.dtype", "float33", r"config\.export\.dtype='float33': use one of bfloat16, float16, float32, auto"),
    ("student.param_dtype", "fp32", r"config\.student\.param_dtype='fp32': use one of"),
    ("teacher.dtype", "bf17", r"config\.teacher\.dtype='bf17': use one of"),
    ("mesh.data", 0, r"config\.mesh\.data=0: must be >= 1, or -1"),
    ("data.batch_size", 0, r"config\.data\.batch_size=0: must be >= 1"),
    ("data.eval_batches", 0, r"config\.data\.eval_batches=0: must be >= 1, or None"),
    ("optimizer.schedule", "cosin", r"config\.optimizer\.schedule='cosin': use one of cosine, linear, constant"),
    ("optimizer.warmup_steps", -3, r"config\.optimizer\.warmup_steps=-3: must be >= 0"),
    ("optimizer.min_lr_ratio", -1.0, r"config\.optimizer\.min_lr_ratio=-1\.0: must be in \[0, 1\]"),
    ("optimizer.b1", 1.5, r"config\.optimizer\.b1=1\.5: must be in \[0, 1\)"),
    ("distributed.coordinator", "127.0.0.1:1234",
     r"config\.distributed\.num_processes=0: with distributed\.coordinator='127\.0\.0\.1:1234' it must be the "
     r"number of processes"),
])
def test_bad_config_values_name_the_key(key, value, match):
  with pytest.raises(config_base.ConfigError, match=match):
    config_base.validate(load_config(**{key: value}))


@pytest.mark.parametrize("overrides,match", [
    ({"distill.on_policy.fraction": 1.5}, r"config\.distill\.on_policy\.fraction=1\.5: must be in \[0, 1\]"),
    ({"distill.on_policy.fraction": 0.5, "teacher.cache": "/c"},
     r"config\.teacher\.cache='/c': holds the teacher's log-probs on the dataset's tokens only; on-policy .* needs "
     r"the teacher model"),
    ({"distill.on_policy.fraction": 0.5, "distill.alpha": 0.0},
     r"config\.distill\.on_policy\.fraction=0\.5: .* needs logit distillation"),
    ({"distill.on_policy.fraction": 0.5, "distill.on_policy.max_new_tokens": 128},  # tiny configs' seq_len
     r"config\.distill\.on_policy\.max_new_tokens=128: must be in \[0, data\.seq_len=128\)"),
    ({"distill.on_policy.fraction": 0.5, "distill.on_policy.top_p": 0.0},
     r"config\.distill\.on_policy\.top_p=0\.0: must be in \(0, 1\]"),
])
def test_bad_on_policy_settings_name_the_key(overrides, match):
  with pytest.raises(config_base.ConfigError, match=match):
    config_base.validate(load_config(**overrides))


def test_misspelt_override_is_named():
  with pytest.raises(config_base.ConfigError, match=r"config\.optimizer\.learning_rate: no such key"):
    load_config(**{"optimizer.learning_rate": 1e-3})
  with pytest.raises(config_base.ConfigError, match=r"config\.optimiser\.lr: no such key"):
    load_config(**{"optimiser.lr": 1e-3})
  # On the command line the config is locked (ml_collections' config_flags): refused before anything starts.
  cmd = [sys.executable, "-m", "jaxkd.train", "--config", os.path.join(ROOT, "configs", "tiny_logit.py"),
         "--config.distill.temprature=3"]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert out.returncode != 0 and "temprature" in out.stderr


def test_process_id_out_of_range_is_named():
  cfg = load_config(**{"distributed.coordinator": "127.0.0.1:1234", "distributed.num_processes": 2,
                       "distributed.process_id": 2})
  with pytest.raises(config_base.ConfigError, match=r"config\.distributed\.process_id=2: must be in \[0, 2\)"):
    config_base.validate(cfg)
