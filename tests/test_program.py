"""A run's program from config.json alone: the same step, shardings and inputs as the run, no weight read."""

import jax
import pytest

from jaxkd import models, program, trainer
from tests.runs import load_config


def _spec(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), tree)


@pytest.mark.parametrize("config", ["tiny_logit", "tiny_cross_tokenizer"])
def test_abstract_program_is_the_runs_program_without_reading_weights(tmp_path, monkeypatch, config):
  cfg = load_config(config, workdir=str(tmp_path / "run"), **{"data.batch_size": 8})
  run = trainer.Run(cfg)  # the real set-up: reads both models
  state, batch = run._initial_state(), run._global_batch(run.loader)
  with jax.set_mesh(run.mesh):
    real = run.program.train_step.lower(state, run.program.teacher_params, batch).compile()

  def no_weights(*args, **kwargs):
    raise AssertionError("a weight file was read")

  monkeypatch.setattr(models, "from_pretrained", no_weights)
  monkeypatch.setattr(models.hf_io, "from_pretrained", no_weights)
  prog = program.abstract_program(cfg)
  abstract_state, abstract_teacher, abstract_batch = prog.abstract_inputs()
  assert _spec(abstract_state) == _spec(state)
  assert _spec(abstract_teacher) == _spec(run.program.teacher_params)
  assert _spec(abstract_batch) == _spec(batch)
  assert prog.lc == run.loss_cfg
  with jax.set_mesh(prog.mesh):
    compiled = prog.train_step.lower(abstract_state, abstract_teacher, abstract_batch).compile()
  a, b = compiled.memory_analysis(), real.memory_analysis()
  for field in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes"):
    assert getattr(a, field) == getattr(b, field), field
