"""Teacher cache encodings side by side: bytes per token and the KL from the teacher to what each stores.

  python scripts/cache_fidelity.py [--config configs/tiny_logit.py] [--markdown]

On the held-out rows of the config's data (data.make_loader split "eval", all of them), the bundled trained teacher's
full distribution p at every trained token; then, per scheme, the top-k it stores, decoded back, and q: the decoded
top-k probabilities, the rest of the mass (1 - their sum) spread uniformly over the other V - k ids. A scheme whose
decoded top-k sums past 1 - 1e-9 (DistillKit's fitted tail can) is scaled back to 1 - 1e-9, so that q is a
distribution. Reported: KL(p || q) in nats, mean and max over the tokens.

Schemes:
  jaxkd k=...      this repository's format 2 (jaxkd/teacher_cache/codec.py: Elias-Fano ids, uint8 gaps at
                   capture.logprob_step, a float32 anchor that keeps the top-k mass), at k = 16, 32, 48, 64, 96, 128
  variants         a coarser step; without the anchor (each log-prob rounded on its own, the top-1 as float16);
                   fixed-width ids (ceil(log2 V) bits each) in place of Elias-Fano, for their bytes under zstd
  DistillKit       its recommended (k 128, 16 exact bf16, terms 0,1,2,3,4,sqrt) and budget (k 50, 1 exact, terms
                   0,1,sqrt) schemes, encoded by tests/distillkit_encoder.py (the scheme's definition, not its code)
  MaxText          k = 128 float32 log-probs and int64 ids, exact (12 bytes a value)

Bytes per token: at Qwen2's 151,936 ids (18-bit fixed-width ids) from each scheme's definition, before Parquet;
and on disk at the tiny teacher's vocabulary, the scheme's signal columns written as Parquet with zstd (jaxkd's by
jaxkd.teacher_cache.store itself), their compressed size over the trained tokens. The tiny teacher has 768 ids and
a peaked distribution (mean entropy about 0.44 nats), so the KL columns are measured on a small vocabulary; the
bytes at 151,936 are computed, not measured.
"""

import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
QWEN2_VOCAB = 151_936
EPS = 1e-9


def held_out(config_path: str):
  """(config, vocabulary size, batches): every held-out row of the config's data (data.make_loader's "eval" split,
  not the run's eval subset), batched as the run batches them."""
  from jaxkd import config_base, data, program  # pylint: disable=import-outside-toplevel
  from jaxkd import step as step_lib  # pylint: disable=import-outside-toplevel

  c = config_base.load(config_path, {"data.eval_batches": None})
  tok = program.load_tokenizers(c, step_lib.loss_config(c)).student
  loader = data.make_loader(c.data, tokenizer=tok, seq_len=c.data.seq_len, batch_size=c.data.batch_size, seed=c.seed,
                            split="eval")
  batches = list(loader)
  loader.close()
  return c, int(c.distill.vocab_size or len(tok)), batches


def teacher_distributions(config_path: str):
  """The held-out rows' batches and the teacher's float64 log-probs [N, V] at their N trained tokens."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from jaxkd import models, program  # pylint: disable=import-outside-toplevel

  c, vocab, batches = held_out(config_path)
  teacher = models.from_pretrained(program.model_folder(c.teacher), dtype="float32")
  forward = jax.jit(lambda ids, seg, pos: jax.nn.log_softmax(teacher(ids, segment_ids=seg, positions=pos)[..., :vocab]
                                                              .astype(jnp.float32), axis=-1))
  logp = [np.asarray(forward(b["input_ids"], b["segment_ids"], b["positions"]), np.float64)[b["loss_mask"] > 0]
          for b in batches]
  return c, batches, np.concatenate(logp), vocab


def kl_to(logp_NxV, idx_NxK, q_lp_NxK):
  """KL(p || q) per token, q the decoded top-k and the rest spread over the other ids (see the docstring)."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  n, v = logp_NxV.shape
  k = idx_NxK.shape[1]
  q_NxK = np.exp(q_lp_NxK.astype(np.float64))
  s_N1 = q_NxK.sum(1, keepdims=True)
  q_NxK = np.where(s_N1 > 1 - EPS, q_NxK * (1 - EPS) / s_N1, q_NxK)
  rest_N = (1 - q_NxK.sum(1)) / max(v - k, 1)
  q_NxV = np.repeat(rest_N[:, None], v, 1)
  np.put_along_axis(q_NxV, idx_NxK, q_NxK, 1)
  return (np.exp(logp_NxV) * (logp_NxV - np.log(q_NxV))).sum(1)


def parquet_bytes(table, columns) -> int:
  """Compressed bytes of `columns` in `table` written as Parquet with zstd (what a shard holds of them)."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "t.parquet")
    pq.write_table(table, path, compression="zstd")
    meta = pq.ParquetFile(path).metadata
    total = 0
    for g in range(meta.num_row_groups):
      for j in range(meta.num_columns):
        col = meta.row_group(g).column(j)
        if col.path_in_schema.split(".")[0] in columns:
          total += col.total_compressed_size
    return total


def rows_of(batches, per_token_N, n_tokens):
  """Split per-token items back into the loader's rows (a shard's row structure)."""
  out, start = [], 0
  for batch in batches:
    for mask_T in batch["loss_mask"]:
      n = int((mask_T > 0).sum())
      out.append(per_token_N[start:start + n])
      start += n
  assert start == n_tokens
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny_logit.py"))
  parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
  args = parser.parse_args()

  import numpy as np  # pylint: disable=import-outside-toplevel
  import pyarrow as pa  # pylint: disable=import-outside-toplevel

  from jaxkd.teacher_cache import codec, store  # pylint: disable=import-outside-toplevel
  from tests import distillkit_encoder as dk  # pylint: disable=import-outside-toplevel

  c, batches, logp_NxV, vocab = teacher_distributions(args.config)
  n = logp_NxV.shape[0]
  order_NxV = np.argsort(-logp_NxV, axis=1, kind="stable")
  step = float(c.capture.logprob_step)
  results = []  # (scheme, k, bytes at Qwen2, bytes on disk, kl_N)

  def top(k):
    idx_NxK = order_NxV[:, :k]
    return idx_NxK, np.take_along_axis(logp_NxV, idx_NxK, 1)

  def jaxkd_disk(k, s, fixed_ids=False):
    """The signal columns of shards written by store.encode_rows over the held-out batches."""
    tables, start = [], 0
    for batch in batches:
      m = batch["loss_mask"] > 0
      idx_BxTxK = np.zeros(m.shape + (k,), np.int32)
      lp_BxTxK = np.zeros(m.shape + (k,), np.float32)
      idx_NxK, lp_NxK = top(k)
      idx_BxTxK[m], lp_BxTxK[m] = idx_NxK[start:start + m.sum()], lp_NxK[start:start + m.sum()]
      start += int(m.sum())
      tables.append(store.encode_rows(batch, idx_BxTxK, lp_BxTxK, 0, vocab_size=vocab, step=s))
    table = pa.concat_tables(tables)
    if fixed_ids:  # the same values, ids packed at ceil(log2 V) bits in id order
      bits = int(np.ceil(np.log2(vocab)))
      idx_sorted_NxK = np.sort(top(k)[0], 1)
      packed = [np.packbits(((r[:, :, None] >> np.arange(bits - 1, -1, -1)) & 1).reshape(len(r), -1).astype(np.uint8),
                            axis=1).tobytes() for r in rows_of(batches, idx_sorted_NxK, n)]
      table = table.set_column(table.schema.get_field_index("topk_ids"), "topk_ids", pa.array(packed, pa.binary()))
    return parquet_bytes(table, store.SIGNAL_KEYS) / n

  # jaxkd's format at the configured step, and variants.
  for k in (16, 32, 48, 64, 96, 128):
    idx_NxK, lp_NxK = top(k)
    got_idx, got_lp = codec.decode(*codec.encode(idx_NxK, lp_NxK, vocab, step), vocab, step)
    kl_N = kl_to(logp_NxV, got_idx, got_lp)
    results.append((f"jaxkd, step 1/{round(1 / step)} nat", k, codec.token_bytes(k, QWEN2_VOCAB),
                    jaxkd_disk(k, step), kl_N))
  idx_NxK, lp_NxK = top(128)
  coarse = 2 * step
  got_idx, got_lp = codec.decode(*codec.encode(idx_NxK, lp_NxK, vocab, coarse), vocab, coarse)
  results.append((f"jaxkd, step 1/{round(1 / coarse)} nat", 128, codec.token_bytes(128, QWEN2_VOCAB),
                  jaxkd_disk(128, coarse), kl_to(logp_NxV, got_idx, got_lp)))
  top1_N = lp_NxK[:, 0].astype(np.float16).astype(np.float64)
  rounded_NxK = top1_N[:, None] - np.clip(np.round((top1_N[:, None] - lp_NxK) / step), 0, codec.GAP_MAX) * step
  results.append(("jaxkd without the anchor (fp16 top-1, gaps rounded)", 128,
                  codec.token_bytes(128, QWEN2_VOCAB) - 2, float("nan"), kl_to(logp_NxV, idx_NxK, rounded_NxK)))
  fixed_bytes = -(-128 * int(np.ceil(np.log2(QWEN2_VOCAB))) // 8) + 128 + 4
  results.append(("jaxkd with fixed-width ids", 128, fixed_bytes, jaxkd_disk(128, step, fixed_ids=True),
                  kl_N))  # the k = 128 row's values

  # DistillKit's schemes, encoded from their definition.
  schema = pa.schema([("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
                      ("bytepacked_indices", pa.list_(pa.list_(pa.uint8())))])
  for name, scheme in (("DistillKit recommended", dk.recommended), ("DistillKit budget", dk.budget)):
    cfg = scheme(vocab)
    k = cfg["k"]
    idx_NxK, lp_NxK = top(k)
    encoded = [dk.encode_token(lp_NxK[i].astype(np.float32), idx_NxK[i], cfg) for i in range(n)]
    recon_NxK = np.array([e[2] for e in encoded])
    stored_idx_NxK = np.array([e[4] for e in encoded])
    rows = [{"compressed_logprobs": [encoded[i][0] for i in r], "bytepacked_indices": [encoded[i][1] for i in r]}
            for r in rows_of(batches, np.arange(n), n)]
    disk = parquet_bytes(pa.Table.from_pylist(rows, schema=schema), schema.names) / n
    results.append((name, k, dk.token_bytes(scheme(QWEN2_VOCAB)), disk,
                    kl_to(logp_NxV, stored_idx_NxK, recon_NxK)))

  # MaxText: exact float32 log-probs and int64 ids.
  idx_NxK, lp_NxK = top(128)
  lp32_NxK = lp_NxK.astype(np.float32)
  rows = [{"logprobs": lp32_NxK[r].reshape(-1), "ids": idx_NxK[r].reshape(-1).astype(np.int64)}
          for r in rows_of(batches, np.arange(n), n)]
  table = pa.Table.from_pylist(rows, schema=pa.schema([("logprobs", pa.list_(pa.float32())),
                                                       ("ids", pa.list_(pa.int64()))]))
  results.append(("MaxText float32 + int64", 128, 128 * 12, parquet_bytes(table, ("logprobs", "ids")) / n,
                  kl_to(logp_NxV, idx_NxK, lp32_NxK)))

  head = ["scheme", "k", "B/token at 151,936", f"B/token on disk at {vocab} (zstd)", "KL mean (nats)", "KL max"]
  lines = []
  for name, k, qwen, disk, kl_N in results:
    lines.append([name, str(k), str(qwen), "-" if np.isnan(disk) else f"{disk:.1f}", f"{kl_N.mean():.5f}",
                  f"{kl_N.max():.4f}"])
  rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
  print(f"{n} held-out trained tokens, teacher {c.teacher.path}, vocabulary {vocab}, commit {rev.strip()}")
  print_table(head, lines, markdown=args.markdown)


def print_table(header: list[str], rows: list[list[str]], *, markdown: bool) -> None:
  """`rows` under `header`: a Markdown table, or columns aligned for a terminal."""
  if markdown:
    for r in [header, ["---"] * len(header), *rows]:
      print("| " + " | ".join(map(str, r)) + " |")
    return
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  for r in [header, *rows]:
    print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))


if __name__ == "__main__":
  main()
