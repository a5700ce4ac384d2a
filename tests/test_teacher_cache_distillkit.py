"""The DistillKit capture reader against captures built here from the format's definition.

The encoder (tests/distillkit_encoder.py) follows DistillKit 1.0's compressor as its source defines it
(distillkit/compression/monotonic_logprobs.py, bitpack.py, compressor.py; sample_common.py for the Parquet schema)
with its own arithmetic: float64 least squares, bit streams built as Python integers. It shares nothing with the
reader, so a mistake in either shows up as a mismatch.
"""

import os

import ml_dtypes
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jaxkd.teacher_cache.distillkit import DistillKitCapture, DistillKitError, is_capture
from tests.distillkit_encoder import basis, budget, encode_token, recommended, token_bytes

D = 769  # the tokenizer's max(len(vocab) + 1, largest id): ceil(log2 769) = 10-bit ids
TEACHER_VOCAB = 800  # the teacher's padded embedding rows: ids 769..799 exist in its top-k
PAD = 5
MAX_LEN = 24
SCHEMA = pa.schema([("input_ids", pa.list_(pa.uint64())),
                    ("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
                    ("bytepacked_indices", pa.list_(pa.list_(pa.uint8())))])

# Every field DistillKit's yaml dump writes (model_dump(mode="json") of DistributionQuantizationConfig).
RECOMMENDED = recommended(D)
BUDGET = budget(D)
# The other paths of the format: delta encoding, residual bins (8-bit with a float16 scale, 2-bit with bfloat16).
BINNED = {**RECOMMENDED, "exact_dtype": "float32", "polynomial_terms": [0, 1, 2, "sqrt"], "delta_encoding": True,
          "residual_bins": [{"scale_dtype": "float16", "element_bits": 8, "num_elements": 16},
                            {"scale_dtype": "bfloat16", "element_bits": 2, "num_elements": 64}]}


def teacher_logprobs(rng, k: int):
  """A peaked teacher distribution over TEACHER_VOCAB ids, its top-k (float32 as vLLM returns them)."""
  logits = rng.normal(size=TEACHER_VOCAB) * 1.5
  logits[rng.choice(TEACHER_VOCAB, 3, replace=False)] += [9.0, 6.0, 4.0]
  logits[790] += 5.0  # a padded-embedding id, past d, among the top
  logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
  top = np.argsort(-logp)[:k]
  rng.shuffle(top)  # the compressor sorts; hand it the top-k out of order
  return logp[top].astype(np.float32), top


def write_capture(folder, cfg, lengths, files=(("data_0.parquet", 1), ("data_2.parquet", 2), ("data_10.parquet", 1)),
                  seed=0):
  """A capture of len(lengths) rows split across `files` ((name, row groups)); returns the rows' truth."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "compression_config.yaml"), "w", encoding="utf-8") as f:
    yaml.safe_dump(cfg, f)
  rng = np.random.default_rng(seed)
  rows, truth = [], []
  for length in lengths:
    ids = list(rng.integers(6, D, size=length))
    if length < MAX_LEN:
      ids.append(PAD)  # what the capture does to a row under the length limit
    tokens = [encode_token(*teacher_logprobs(rng, cfg["k"]), cfg) for _ in range(len(ids) - 1)]
    lp_rows, idx_rows, recons, origs, indices = zip(*tokens) if tokens else ([],) * 5
    rows.append({"input_ids": ids, "compressed_logprobs": list(lp_rows), "bytepacked_indices": list(idx_rows)})
    truth.append({"input_ids": np.array(ids), "recon": np.array(recons).reshape(-1, cfg["k"]),
                  "orig": np.array(origs).reshape(-1, cfg["k"]), "indices": np.array(indices).reshape(-1, cfg["k"])})
  per_group = -(-len(rows) // sum(g for _, g in files))
  chunks = [rows[i : i + per_group] for i in range(0, len(rows), per_group)]
  for name, groups in files:
    with pq.ParquetWriter(os.path.join(folder, name), SCHEMA) as w:
      for _ in range(groups):
        chunk = chunks.pop(0) if chunks else []
        w.write_table(pa.Table.from_pylist(chunk, schema=SCHEMA))
  return truth


# ---------------------------------------------------------------------------------------------------------------
# Decoding

LENGTHS = [24, 9, 17, 24, 3, 12, 24, 2]


@pytest.fixture(scope="module", params=["recommended", "budget", "binned"])
def capture(request, tmp_path_factory):
  cfg = {"recommended": RECOMMENDED, "budget": BUDGET, "binned": BINNED}[request.param]
  folder = str(tmp_path_factory.mktemp(request.param))
  return request.param, cfg, write_capture(folder, cfg, LENGTHS), DistillKitCapture(folder)


def test_rows_shapes_and_mask(capture):
  _, cfg, truth, cap = capture
  assert is_capture(cap.folder) and len(cap) == len(LENGTHS)
  assert cap.k == cfg["k"] and cap.vocab_dim == D and cap.config == cfg
  for i, want in enumerate(truth):  # files in numeric order (data_2 before data_10), across row groups
    row = cap[i]
    t = len(want["input_ids"])
    assert t == LENGTHS[i] + (LENGTHS[i] < MAX_LEN)
    np.testing.assert_array_equal(row["input_ids"], want["input_ids"])
    assert row["input_ids"].dtype == np.int32 and row["indices"].dtype == np.int32
    assert row["logprobs"].dtype == np.float32 and row["signal_mask"].dtype == bool
    assert row["indices"].shape == row["logprobs"].shape == (t, cfg["k"])
    np.testing.assert_array_equal(row["signal_mask"], np.arange(t) < t - 1)
    if LENGTHS[i] < MAX_LEN:
      assert row["input_ids"][-1] == PAD and row["signal_mask"][-2]  # the last real token has its signal
    np.testing.assert_array_equal(row["indices"][:-1], want["indices"])
    assert (row["indices"][-1] == 0).all() and (row["logprobs"][-1] == -np.inf).all()
  assert (np.concatenate([cap[i]["indices"] for i in range(len(cap))]) >= D).any()  # padded-embedding ids kept
  np.testing.assert_array_equal(cap[-1]["input_ids"], truth[-1]["input_ids"])
  with pytest.raises(IndexError):
    cap[len(cap)]


def test_exact_values(capture):
  _, cfg, truth, cap = capture
  if cfg["delta_encoding"]:
    pytest.skip("with delta encoding the stored exact values are deltas")
  e = cfg["exact_k"]
  for i, want in enumerate(truth):
    got = cap[i]["logprobs"][:-1, :e]
    np.testing.assert_array_equal(got, want["orig"][:, :e].astype(ml_dtypes.bfloat16).astype(np.float32))


def tail_errors(cfg, truth, cap):
  e = cfg["exact_k"]
  got = np.concatenate([cap[i]["logprobs"][:-1] for i in range(len(cap))])
  recon = np.concatenate([t["recon"] for t in truth])
  orig = np.concatenate([t["orig"] for t in truth]).astype(np.float64)
  return got[:, e:], recon[:, e:], orig[:, e:]


# How far the float32 decode of the stored coefficients may sit from their float64 evaluation. Measured on these
# captures (3 seeds): up to 2.7e-6 recommended, 1.3e-6 budget, 1.1e-6 binned (delta sums rounded to float32).
DECODE_TOL = 2e-5


def test_tail_decodes_what_was_stored(capture):
  _, cfg, truth, cap = capture
  got, recon, _ = tail_errors(cfg, truth, cap)
  np.testing.assert_allclose(got, recon, rtol=0, atol=DECODE_TOL)
  # The bound means something: rank t + 1 in place of t, or the terms in reverse order, miss it by far.
  if not cfg["delta_encoding"]:
    coeffs = np.linalg.lstsq(basis(cfg, cfg["k"] - cfg["exact_k"]), recon.T, rcond=None)[0]
    shifted = basis(cfg, cfg["k"] - cfg["exact_k"], shift=1) @ coeffs
    assert np.abs(shifted.T - recon).max() > 100 * DECODE_TOL
    assert np.abs((basis(cfg, cfg["k"] - cfg["exact_k"])[:, ::-1] @ coeffs).T - recon).max() > 100 * DECODE_TOL


# The scheme's own loss, |decoded - original| over the tail ranks, on these peaked three-bump distributions
# (measured over 3 seeds; the test's seed 0 in brackets). It is the least-squares fit's error: the decode adds
# under DECODE_TOL to it. Bounds: (max, mean) in nats.
#   recommended (bf16 top 16, 6 terms over ranks 16..127): max 0.13-0.20 [0.198], mean 0.018-0.019
#   budget (bf16 top 1, [0, 1, sqrt] over ranks 1..49):    max 1.64-1.85 [1.845], mean 0.111-0.115; the bumps at
#                                                          ranks 1-3 are what 3 terms cannot follow
#   binned (delta, 4 terms, 8-bit then 2-bit residuals):   max 0.41-0.51 [0.422], mean 0.064-0.082; 8-bit ranks
#                                                          under 0.004, the error then summed along the deltas
TAIL_BOUND = {"recommended": (0.22, 0.02), "budget": (1.9, 0.12), "binned": (0.45, 0.075)}


def test_tail_within_scheme_error(capture):
  name, cfg, truth, cap = capture
  got, recon, orig = tail_errors(cfg, truth, cap)
  err = np.abs(got - orig)
  print(f"{name}: tail |decoded - original| max {err.max():.4f} mean {err.mean():.4f} nats")
  assert err.max() < TAIL_BOUND[name][0] and err.mean() < TAIL_BOUND[name][1]
  # Never worse than the stored description (the fit, plus residuals) by more than the decode's rounding.
  assert (err <= np.abs(recon - orig) + DECODE_TOL).all()
  if cfg["residual_bins"]:  # the 8-bit bin covers the first 16 tail ranks: about half a step of its scale
    assert err[:, :16].max() < 0.005


def test_token_bytes_of_the_schemes():
  """What scripts/cache_fidelity.py charges each scheme, against the encoder's own bytes: 344 and 127 a token at
  Qwen2's 151,936 ids (18-bit ids), as DistillKit's documentation gives them."""
  assert token_bytes(recommended(151_936)) == 288 + 16 * 2 + 6 * 4 == 344
  assert token_bytes(budget(151_936)) == 113 + 2 + 3 * 4 == 127
  rng = np.random.default_rng(2)
  for cfg in (RECOMMENDED, BUDGET, BINNED):
    values, ids, *_ = encode_token(*teacher_logprobs(rng, cfg["k"]), {**cfg, "d": TEACHER_VOCAB})
    assert len(values) + len(ids) == token_bytes({**cfg, "d": TEACHER_VOCAB})


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_not_a_capture(tmp_path):
  assert not is_capture(str(tmp_path))
  with pytest.raises(DistillKitError, match="compression_config.yaml"):
    DistillKitCapture(str(tmp_path))


@pytest.mark.parametrize("change, field", [
    ({"k": None}, "'k'"),
    ({"exact_dtype": "float8"}, "exact_dtype"),
    ({"polynomial_terms": [0, "log"]}, "polynomial_terms"),
    ({"residual_bins": [{"scale_dtype": "float16", "element_bits": 8}]}, r"residual_bins\[0\]"),
    ({"dither": True}, "dither"),
    ({"exact_k": 200}, "exact_k"),
])
def test_bad_config(tmp_path, change, field):
  cfg = {**RECOMMENDED, **change}
  cfg = {key: value for key, value in cfg.items() if value is not None}
  write_capture(str(tmp_path), RECOMMENDED, [3], files=(("data_0.parquet", 1),))
  with open(tmp_path / "compression_config.yaml", "w", encoding="utf-8") as f:
    yaml.safe_dump(cfg, f)
  with pytest.raises(DistillKitError, match=field):
    DistillKitCapture(str(tmp_path))


def test_legacy_config_refused(tmp_path):
  write_capture(str(tmp_path), RECOMMENDED, [3], files=(("data_0.parquet", 1),))
  with open(tmp_path / "compression_config.yaml", "w", encoding="utf-8") as f:
    yaml.safe_dump({"legacy_logit_compression": {"vocab_size": D, "k": 128, "exact_k": 32,
                                                 "polynomial_degree": 8}}, f)
  with pytest.raises(DistillKitError, match="legacy"):
    DistillKitCapture(str(tmp_path))


def _rewrite_row(folder, row_index, edit):
  path = os.path.join(folder, "data_0.parquet")
  rows = pq.read_table(path).to_pylist()
  edit(rows[row_index])
  pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)


def test_wrong_byte_length(tmp_path):
  write_capture(str(tmp_path), BUDGET, [5, 6, 7], files=(("data_0.parquet", 1),))
  _rewrite_row(str(tmp_path), 1, lambda row: row["compressed_logprobs"][3].pop())
  cap = DistillKitCapture(str(tmp_path))
  cap[0]
  with pytest.raises(DistillKitError, match=r"data_0.parquet row 1 .*compressed_logprobs at position 3"):
    cap[1]
  # A capture read with another config: every vector's length is off.
  with open(tmp_path / "compression_config.yaml", "w", encoding="utf-8") as f:
    yaml.safe_dump(RECOMMENDED, f)
  with pytest.raises(DistillKitError, match="row 0 .*bytes"):
    DistillKitCapture(str(tmp_path))[0]


def test_signal_count_mismatch(tmp_path):
  write_capture(str(tmp_path), BUDGET, [5, 6, 7], files=(("data_0.parquet", 1),))
  _rewrite_row(str(tmp_path), 2, lambda row: row["input_ids"].pop())
  cap = DistillKitCapture(str(tmp_path))
  with pytest.raises(DistillKitError, match=r"data_0.parquet row 2 .*7 compressed_logprobs vectors for 7 input_ids"):
    cap[2]


def test_binary_byte_columns(tmp_path):
  """The same capture with its byte vectors as list<binary> reads the same."""
  truth = write_capture(str(tmp_path / "lists"), BUDGET, [5, 24], files=(("data_0.parquet", 1),))
  table = pq.read_table(tmp_path / "lists" / "data_0.parquet")
  binary = pa.schema([("input_ids", pa.list_(pa.uint64())), ("compressed_logprobs", pa.list_(pa.binary())),
                      ("bytepacked_indices", pa.list_(pa.binary()))])
  rows = [{key: [bytes(v) for v in value] if key != "input_ids" else value for key, value in row.items()}
          for row in table.to_pylist()]
  os.makedirs(tmp_path / "binary")
  pq.write_table(pa.Table.from_pylist(rows, schema=binary), tmp_path / "binary" / "data_0.parquet")
  with open(tmp_path / "binary" / "compression_config.yaml", "w", encoding="utf-8") as f:
    yaml.safe_dump(BUDGET, f)
  lists, binaries = DistillKitCapture(str(tmp_path / "lists")), DistillKitCapture(str(tmp_path / "binary"))
  for i in range(2):
    for key in ("input_ids", "indices", "logprobs", "signal_mask"):
      np.testing.assert_array_equal(lists[i][key], binaries[i][key])
  np.testing.assert_array_equal(binaries[1]["indices"][:-1], truth[1]["indices"])


@pytest.mark.parametrize("cfg", [RECOMMENDED, BUDGET, BINNED,
                                 {**RECOMMENDED, "exact_k": 0, "term_dtype": "bfloat16", "normalize_t": True,
                                  "delta_encoding": True, "polynomial_terms": [0, 1, 2, "sqrt", "exp"]}],
                         ids=["recommended", "budget", "binned", "bf16_terms"])
def test_against_distillkit(tmp_path, cfg):
  """DistillKit's own compressor and decoder, where its source is importable (it is not on PyPI: put a checkout of
  github.com/arcee-ai/DistillKit on PYTHONPATH; its compression package needs torch and pydantic)."""
  torch = pytest.importorskip("torch")
  compression = pytest.importorskip("distillkit.compression")
  compressor = compression.LogprobCompressor(config=compression.DistributionQuantizationConfig.model_validate(cfg))
  with open(tmp_path / "compression_config.yaml", "w", encoding="utf-8") as f:
    yaml.safe_dump(cfg, f)
  rng = np.random.default_rng(1)
  rows, want = [], []
  for length in (9, 24):
    logits = torch.tensor(rng.normal(size=(length - 1, TEACHER_VOCAB)) * 1.5, dtype=torch.float32)
    values, ids = torch.topk(torch.log_softmax(logits, -1), cfg["k"], dim=-1)
    out = compressor.compress_from_sparse(ids[None], values[None])
    rows.append({"input_ids": rng.integers(0, D, size=length).tolist(),
                 "compressed_logprobs": out["compressed_logprobs"][0].tolist(),
                 "bytepacked_indices": out["bytepacked_indices"][0].tolist()})
    ids, values = compressor.decompress_to_sparse(out)
    want.append((ids[0].numpy(), values[0].float().numpy()))
  pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp_path / "data_0.parquet")
  cap = DistillKitCapture(str(tmp_path))
  for i, (ids, values) in enumerate(want):
    np.testing.assert_array_equal(cap[i]["indices"][:-1], ids)
    # Bit for bit but the order of a float32 sum of six terms.
    np.testing.assert_allclose(cap[i]["logprobs"][:-1], values, rtol=0, atol=1e-5)


def test_non_finite_signal(tmp_path):
  """A NaN coefficient (what DistillKit stores for a top-k with -inf in it) is an error that names the position."""
  write_capture(str(tmp_path), BUDGET, [5, 6], files=(("data_0.parquet", 1),))
  nan_coeff = list(np.array([np.nan], np.float32).tobytes())
  _rewrite_row(str(tmp_path), 1, lambda row: row["compressed_logprobs"][4].__setitem__(slice(2, 6), nan_coeff))
  cap = DistillKitCapture(str(tmp_path))
  cap[0]
  with pytest.raises(DistillKitError, match="row 1 .*position 4 decodes to non-finite"):
    cap[1]


# ---------------------------------------------------------------------------------------------------------------
# Training from a capture


def test_a_run_trains_from_a_distillkit_capture(tmp_path):
  """Its rows are the training data; ids of the teacher's padded rows (790 here, past the student's 768-token
  vocabulary) are dropped by the loss, never gathered out of range; every position with a signal is trained."""
  import json  # pylint: disable=import-outside-toplevel

  from jaxkd import teacher_cache, trainer  # pylint: disable=import-outside-toplevel
  from tests.runs import load_config  # pylint: disable=import-outside-toplevel

  folder = str(tmp_path / "dk")
  write_capture(folder, BUDGET, [MAX_LEN] * 12 + [9, 17, 3, 12], files=(("data_0.parquet", 1),))
  assert isinstance(teacher_cache.open(folder), DistillKitCapture)
  run = trainer.Run(load_config(**{"workdir": str(tmp_path / "run"), "teacher.cache": folder, "steps": 2,
                                   "data.seq_len": 32, "samples.count": 0, "export.enabled": False,
                                   "eval_every": 0}))
  assert run.teacher is None and "DistillKit capture" in run.loader.summary()
  first = next(run.loader)
  run.loader.set_state({"cache_batch": 0})
  assert first["teacher_indices"].shape == (8, 32, BUDGET["k"]) and (first["teacher_indices"] >= 768).any()
  np.testing.assert_array_equal(first["loss_mask"].sum(1), [MAX_LEN - 1] * 8)  # 23 signals, 23 inputs each
  np.testing.assert_array_equal(first["targets"][:, :MAX_LEN - 2], first["input_ids"][:, 1:MAX_LEN - 1])
  run.train()
  steps = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl") if '"kd"' in l]
  assert len(steps) == 2 and all(np.isfinite(s["kd"]) and s["kd"] > 0 for s in steps)
