"""The exact KD train step, compiled by the real TPU compiler for a TPU topology, from this CPU host.

libtpu (the `tpu` extra, which .ci/run installs) compiles for compile-only devices of a named topology; nothing
runs.
"""

import re

import jax
import pytest

from jaxkd import program
from tests.runs import load_config

topologies = pytest.importorskip("jax.experimental.topologies")


def _tpu_devices(name: str):
  try:
    return topologies.get_topology_desc(topology_name=name, platform="tpu").devices
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
