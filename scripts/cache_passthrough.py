"""For comparing the student's held-out loss after distilling from each scheme (BENCHMARKS.md, "Teacher cache"):
a jaxkd capture, or a run from it, whose codec is swapped for one that stores int32 ids and float32 log-probs
as they are, after DistillKit's scheme (tests/distillkit_encoder.py) where MODE names one. Its caches are not
jaxkd's format; nothing else reads them.

  python scripts/cache_passthrough.py dk_rec|dk_budget|exact jaxkd.capture --config ... --config.capture.dir=D
  python scripts/cache_passthrough.py dk_rec|dk_budget|exact jaxkd.train --config ... --config.teacher.cache=D
"""

import os
import runpy
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxkd.teacher_cache import codec  # noqa: E402
from tests import distillkit_encoder as dk  # noqa: E402

MODE = sys.argv.pop(1)
MODULE = sys.argv.pop(1)


def encode(idx, lp, vocab, step):
  n, k = idx.shape
  lp = lp.astype(np.float32)
  if MODE != "exact":
    cfg = (dk.recommended if MODE == "dk_rec" else dk.budget)(vocab)
    assert cfg["k"] == k, f"{MODE} stores k={cfg['k']}: capture with capture.top_k={cfg['k']}"
    out = [dk.encode_token(lp[i], idx[i], cfg) for i in range(n)]
    idx = np.array([o[4] for o in out], np.int32).reshape(n, k)
    lp = np.array([o[2] for o in out], np.float64).reshape(n, k).astype(np.float32)
  blob = np.concatenate([np.ascontiguousarray(idx, np.int32).view(np.uint8).reshape(n, 4 * k),
                         np.ascontiguousarray(lp).view(np.uint8).reshape(n, 4 * k)], 1)
  return blob, np.zeros(n, np.float32), np.zeros((n, k), np.uint8)


def decode(blob, anchor, gaps, vocab, step):
  n, k = gaps.shape
  return blob[:, :4 * k].copy().view(np.int32), blob[:, 4 * k:].copy().view(np.float32)


codec.id_bytes = lambda k, vocab: 8 * k
codec.encode, codec.decode = encode, decode
sys.argv[0] = MODULE
runpy.run_module(MODULE, run_name="__main__", alter_sys=True)
