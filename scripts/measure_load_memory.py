"""Peak host memory (RSS) while loading a ~1 GB checkpoint, with and without a device mesh.

  python scripts/measure_load_memory.py [--folder DIR]

Builds a randomly initialised Qwen2-0.5B-shaped checkpoint in bf16 (988 MB) unless --folder is given,
then, each in a fresh process: the baseline RSS after imports, and the peak RSS of
`jaxkd.models.from_pretrained` onto one device and onto an 8-device (simulated) fsdp mesh. For contrast,
the same file read whole with the safetensors package and then placed on the device.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import os, sys, json, resource
if {devices} > 1:
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count={devices}"
import jax, numpy as np
from jaxkd import models, sharding
def rss_mb(key="VmRSS"):
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024
def peak_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
jax.numpy.zeros(1).block_until_ready()
base = rss_mb()
mode = "{mode}"
if mode == "jaxkd":
  mesh = sharding.make_mesh({{"data": 1, "fsdp": {devices}, "tensor": 1}}) if {devices} > 1 else None
  model = models.from_pretrained("{folder}", dtype="bfloat16", mesh=mesh)
  jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(model)))
elif mode == "naive":
  from safetensors.flax import load_file
  tensors = load_file("{folder}/model.safetensors")
  arrays = {{k: jax.device_put(v) for k, v in tensors.items()}}
  jax.block_until_ready(list(arrays.values()))
print(json.dumps({{"baseline_mb": base, "peak_mb": peak_mb(), "after_mb": rss_mb(), "file_mb": rss_mb("RssFile")}}))
"""


def build(folder):
  code = f"""
import jax.numpy as jnp
from flax import nnx
from jaxkd import models
from jaxkd.models import presets
cfg = models.config_from_hf(presets.PRESETS["Qwen/Qwen2-0.5B"])
m = models.Transformer(cfg, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
models.save_pretrained(m, "{folder}", dtype="bfloat16", max_shard_size=2**40)
"""
  subprocess.run([sys.executable, "-c", code], check=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--folder", default=None)
  args = p.parse_args()
  folder = args.folder or os.path.join(tempfile.gettempdir(), "jaxkd-load-bench-qwen2-0.5b")
  if not os.path.exists(os.path.join(folder, "config.json")):
    build(folder)
  size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
  rows = []
  for mode, devices in (("jaxkd", 1), ("jaxkd", 8), ("naive", 1)):
    out = subprocess.run([sys.executable, "-c", CHILD.format(mode=mode, devices=devices, folder=folder)],
                         check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    r = json.loads(out)
    rows.append((mode, devices, r))
  print(f"checkpoint: {size / 1e6:.0f} MB of bf16 safetensors ({folder})")
  print("| loader | devices | baseline RSS MB | peak RSS MB | peak - baseline MB | (peak - baseline) / checkpoint |")
  print("|---|---|---|---|---|---|")
  for mode, devices, r in rows:
    extra = r["peak_mb"] - r["baseline_mb"]
    name = "jaxkd.models.from_pretrained" if mode == "jaxkd" else "safetensors.flax.load_file + device_put"
    print(f"| {name} | {devices} | {r['baseline_mb']:.0f} | {r['peak_mb']:.0f} | {extra:.0f} | "
          f"{extra * 2**20 / size:.2f} |")


if __name__ == "__main__":
  main()
