"""The exact KD train step, compiled by the real TPU compiler for a TPU topology, from this CPU host.

libtpu (the `tpu` extra, which .ci/run installs) compiles for compile-only devices of a named topology; nothing
runs.
"""

import re

import jax
import pytest

from jaxkd import aot, config_base, program
from jaxkd.models import transformer
from tests.runs import load_config

topologies = pytest.importorskip("jax.experimental.topologies")


def _tpu_devices(name: str):
  try:
    return aot.topology_devices(aot.parse_slice(name))
  except Exception as e:  # noqa: BLE001
    pytest.skip(f"no TPU compiler here (pip install -e \".[tpu]\"): {e}")


def test_kd_step_compiles_for_a_tpu_topology_with_splash_per_shard(tmp_path):
  """v5e:2x2 as a (data 1, fsdp 2, tensor 2) mesh; "auto" attention picks splash because the mesh's devices
  are TPUs (the host is a CPU), and the Mosaic kernels are the student's forward (keeping its residuals), the
  teacher's forward, and the student's dq and dkv backward: four, with no [B, N, T, T] scores anywhere."""
  cfg = load_config(workdir=str(tmp_path / "run"), **{
      "data.batch_size": 8, "data.seq_len": 256, "mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2,
      "student.compute_dtype": "bfloat16", "teacher.dtype": "bfloat16"})
  prog = program.abstract_program(cfg, _tpu_devices("v5e:2x2"))
  assert {d.platform for d in prog.mesh.devices.flat} == {"tpu"}
  # The suite computes at "highest" matmul precision (conftest); Mosaic takes bf16 operands at the default.
  with jax.set_mesh(prog.mesh), jax.default_matmul_precision("default"):
    compiled = prog.train_step.lower(*prog.abstract_inputs()).compile()
  hlo = compiled.as_text()
  assert hlo.count("tpu_custom_call") == 4, hlo.count("tpu_custom_call")
  t = cfg.data.seq_len  # 256, not the kernel's 128 lanes (its softmax statistics are [B, N, T, 128])
  assert not re.search(rf"\[\d+,\d+,{t},{t}\]", hlo)  # the XLA path's scores
  memory = compiled.memory_analysis()
  assert memory.temp_size_in_bytes > 0 and memory.argument_size_in_bytes > 0


@pytest.mark.parametrize("name,topology,hbm", [("v5e-16", "v5e:4x4", 16), ("v5p-8", "v5p:2x2x1", 95),
                                               ("v6e-8", "v6e:2x4", 32), ("v4-8", "v4:2x2x1", 32),
                                               ("v4-16", "v4:2x2x2", 32), ("v5p:2x2x2", "v5p:2x2x2", 95)])
def test_slice_names_are_the_compilers_topologies(name, topology, hbm):
  """Cloud TPU counts v4 and v5p slices in TensorCores (two a chip), v5e and v6e in chips."""
  tpu = aot.parse_slice(name)
  assert (tpu.topology, tpu.hbm_gib) == (topology, hbm)
  devices = _tpu_devices(name)  # one a chip: v4 as megacore chips, as JAX runs it
  assert len(devices) == {"v5e:4x4": 16, "v5p:2x2x1": 4, "v6e:2x4": 8, "v4:2x2x1": 4, "v4:2x2x2": 8,
                          "v5p:2x2x2": 8}[topology]
  assert len({(tuple(d.coords), d.core_on_chip) for d in devices}) == len({tuple(d.coords) for d in devices})


def test_unknown_slices_are_refused_at_start():
  for bad in ("v5e-12", "v3-8", "v5p:2x2"):
    with pytest.raises(config_base.ConfigError, match=r"config\.aot\.topology="):
      config_base.validate(load_config(**{"aot.topology": bad}))


def test_aot_command_reports_what_a_chip_needs(tmp_path, capsys):
  """The train step, and (on-policy steps on) the on-policy step with its sampling loop."""
  cfg = load_config(workdir=str(tmp_path / "run"), **{
      "aot.topology": "v5e-4", "student.compute_dtype": "bfloat16", "teacher.dtype": "bfloat16",
      "distill.on_policy.fraction": 0.5})
  _tpu_devices("v5e:2x2")
  with jax.default_matmul_precision("default"):
    assert aot.report(cfg) == 0
  out = capsys.readouterr().out
  assert "v5e:2x2: 4 chips on 1 host(s), 16 GiB HBM each" in out and "mesh data 1, fsdp 4, tensor 1" in out
  assert "attention: student splash; teacher splash" in out
  figures = re.findall(r"total ([0-9.]+) GiB of 16 GiB HBM: fits", out)
  assert len(figures) == 2 and all(0 < float(f) < 1 for f in figures), out
  assert ("on-policy step (0.5 of the steps): the student completes 8 prompts of up to 64 tokens with up to 64 new "
          "ones") in out
  assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_a_step_too_big_for_the_chip_is_named_with_the_figures_and_the_fix(tmp_path, capsys):
  cfg = load_config(workdir=str(tmp_path / "run"), **{
      "aot.topology": "v5e-4", "student.compute_dtype": "bfloat16", "teacher.dtype": "bfloat16",
      "data.seq_len": 2048, "data.batch_size": 2048})
  _tpu_devices("v5e:2x2")
  with jax.default_matmul_precision("default"):
    assert aot.report(cfg) == 1
  out = capsys.readouterr().out
  assert re.search(r"out of HBM, it does not fit \(16 GiB a chip\).*RESOURCE_EXHAUSTED.*exceeds available HBM", out,
                   re.S), out
  assert "to fit: lower data.batch_size" in out
  order = transformer.REMAT_BY_COST
  now = order.index(cfg.student.remat)
  assert f"set student.remat to {order[now + 1]}" in out and f"(now {cfg.student.remat})" in out, out


def test_aot_search_compiles_each_remat_choice_and_names_the_cheapest(tmp_path, capsys):
  """The search's plumbing on the real compiler, bounded by aot.max_batch to one compile a policy; the search
  itself is checked against brute force in tests/test_aot_search.py."""
  cfg = load_config(workdir=str(tmp_path / "run"), **{
      "aot.topology": "v5e-4", "aot.search": True, "aot.remat_choices": "full, none", "aot.max_batch": 8,
      "student.compute_dtype": "bfloat16", "teacher.dtype": "bfloat16"})
  _tpu_devices("v5e:2x2")
  with jax.default_matmul_precision("default"):
    assert aot.report(cfg) == 0
  out = capsys.readouterr().out
  assert "batches in steps of 4 rows" in out and "up to 8; remat none, full" in out, out
  rows = re.findall(r"^  (none|full) +(\d+) +(\d+) +([0-9.]+)  fits", out, re.M)
  t = cfg.data.seq_len
  assert [(r, int(b), int(n)) for r, b, n, _ in rows] == [("none", 8, 8 * t), ("full", 8, 8 * t)], out
  assert float(rows[1][3]) <= float(rows[0][3])  # remat full keeps less
  assert f"largest batch with remat none: 8 rows ({8 * t} tokens) a step (aot.max_batch, the search's bound)" in out
  assert "data.batch_size=8 fits; the cheapest remat that fits it: none" in out
  assert not (tmp_path / "run").exists()


def test_the_capture_compiles_for_a_slice(tmp_path, capsys):
  """`python -m jaxkd.capture ... --config.aot.topology=SLICE`: the teacher's forward and top-k, compiled."""
  from jaxkd import capture  # pylint: disable=import-outside-toplevel
  cfg = load_config(workdir=str(tmp_path / "run"), **{"aot.topology": "v5e-4", "teacher.dtype": "bfloat16",
                                                       "capture.dir": str(tmp_path / "cache")})
  _tpu_devices("v5e:2x2")
  with jax.default_matmul_precision("default"):
    assert capture.capture(cfg) == 0
  out = capsys.readouterr().out
  assert f"the teacher's top {cfg.capture.top_k} over 8 x {cfg.data.seq_len} tokens a batch" in out
  assert re.search(r"total [0-9.]+ GiB of 16 GiB HBM: fits", out), out
  assert not (tmp_path / "cache").exists()
