"""Every config file loads and passes the start-of-run checks; the hub configs fit the models they name."""

import os

import pytest

from jaxkd import config_base, hidden
from jaxkd.models import config_from_hf
from jaxkd.models.presets import PRESETS
from tests.runs import ROOT, load_config

CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))
HUB = ["qwen2_logit", "sft", "qwen2_hidden", "llama_to_stablelm_hidden"]


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
