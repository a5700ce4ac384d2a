"""The loader (jaxkd.data.loader): order, exact resume, process shares, mixing, eval, cache, global batch.

Documents are identified by their token ids: every row of the test data is distinct, so a document seen in
a batch names the row it came from.
"""

import collections
import json

import jax
import numpy as np
import pytest

from jaxkd.data import DataError, default_data_config, global_batch, make_loader
from jaxkd.data import loader as loader_lib
from jaxkd.data.encode import Encoder
from tests.data_references import packing_efficiency

ANIMALS = ["cat", "dog", "fox", "owl", "bear", "mouse"]


def write_chats(path, n, tag):
  """n distinct chats whose lengths vary (1 to 6 sentences), so packing has something to do."""
  with open(path, "w") as f:
    for i in range(n):
      story = " ".join(f"The {ANIMALS[(i + k) % 6]} number {i} ran." for k in range(1 + i % 6))
      f.write(json.dumps({"messages": [{"role": "user", "content": f"{tag} story {i}?"},
                                       {"role": "assistant", "content": story}]}) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("loader")
  return {"a": write_chats(d / "a.jsonl", 90, "alpha"), "b": write_chats(d / "b.jsonl", 60, "beta"),
          "cache": str(d / "cache")}


def config(*paths, **overrides):
  cfg = default_data_config()
  cfg.sources = [dict(path=p) for p in paths]
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


def loader_for(cfg, tok, data, **kw):
  kw = {"seq_len": 96, "batch_size": 4, "seed": 3, "cache_dir": data["cache"], **kw}
  return make_loader(cfg, tokenizer=tok, **kw)


def docs_of(batch, key="input_ids", seg_key="segment_ids"):
  out = []
  for r in range(batch[seg_key].shape[0]):
    seg = batch[seg_key][r]
    out += [tuple(batch[key][r][seg == s].tolist()) for s in range(1, seg.max() + 1)]
  return out


def all_docs(loader):
  return [d for b in loader for d in docs_of(b)]


def assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_same_seed_same_batches_other_seed_other_order(tok, data):
  cfg = config(data["a"])
  a = [next(loader_for(cfg, tok, data)) for _ in range(1)]
  b = [next(loader_for(cfg, tok, data)) for _ in range(1)]
  assert_batches_equal(a, b)
  c = next(loader_for(cfg, tok, data, seed=4))
  assert not np.array_equal(a[0]["input_ids"], c["input_ids"])


@pytest.mark.parametrize("prefetch, bins", [(0, None), (2, 6)])
def test_resume_is_exact_across_epoch_boundaries(tok, data, prefetch, bins):
  # With 6 packing bins for 4-row batches, restore points fall inside a packed group of rows too.
  cfg = config(data["a"], prefetch=prefetch, packing_bins=bins)
  one_epoch = len(list(loader_for(config(data["a"], epochs=1), tok, data)))
  ref = loader_for(cfg, tok, data)
  states, batches = [], []
  for _ in range(2 * one_epoch + 3):  # restore points before, at and after two epoch boundaries
    states.append(ref.get_state())
    batches.append(next(ref))
  for k in (1, one_epoch - 2, one_epoch, 2 * one_epoch - 1):
    state = json.loads(json.dumps(states[k]))  # what a checkpoint stores
    fresh = loader_for(cfg, tok, data)
    fresh.set_state(state)
    assert_batches_equal([next(fresh) for _ in range(4)], batches[k:k + 4])


def test_epochs_reshuffle_and_end(tok, data):
  examples = collections.Counter(all_docs(loader_for(config(data["a"], epochs=1, shuffle=False), tok, data)))
  assert len(examples) == 90 and set(examples.values()) == {1}
  two = all_docs(loader_for(config(data["a"], epochs=2), tok, data))
  assert collections.Counter(two) == examples + examples  # every example exactly once per epoch
  first, second = two[:60], two[90:150]
  assert first != second  # the second epoch is in another order
  # Finite epochs end; the last batch is padded to full size, and resuming at the end stays at the end.
  loader = loader_for(config(data["a"], epochs=1), tok, data)
  batches = list(loader)
  assert batches[-1]["input_ids"].shape == (4, 96)
  end = loader.get_state()
  fresh = loader_for(config(data["a"], epochs=1), tok, data)
  fresh.set_state(end)
  assert list(fresh) == []


def test_two_processes_read_disjoint_shares_whose_union_is_the_epoch(tok, data):
  cfg = config(data["a"], epochs=1)
  every = collections.Counter(all_docs(loader_for(cfg, tok, data, batch_size=2, process_count=1)))
  shares = []
  for p in range(2):
    loader = loader_for(cfg, tok, data, batch_size=4, process_index=p, process_count=2)
    first = next(loader)
    assert first["input_ids"].shape == (2, 96)  # batch_size is global: each process yields half the rows
    shares.append(collections.Counter(docs_of(first) + all_docs(loader)))
    assert loader.stats["rows_read"] == 45
  assert not set(shares[0]) & set(shares[1])
  assert shares[0] + shares[1] == every


def test_mixing_weights(tok, data):
  cfg = config(data["a"], data["b"])
  cfg.sources[0]["weight"], cfg.sources[1]["weight"] = 3.0, 1.0
  loader = loader_for(cfg, tok, data, seq_len=128, batch_size=8)
  alpha = tok("alpha", add_special_tokens=False)["input_ids"]
  beta = tok("beta", add_special_tokens=False)["input_ids"]
  counts = collections.Counter()
  for _ in range(40):
    for doc in docs_of(next(loader)):
      text = tok.decode(doc)
      counts["a" if "alpha story" in text else "b" if "beta story" in text else "?"] += 1
  assert alpha and beta and counts["?"] == 0
  share = counts["a"] / (counts["a"] + counts["b"])
  assert abs(share - 0.75) < 0.03, counts


def test_eval_fraction_is_held_out_from_train(tok, data):
  train = set(all_docs(loader_for(config(data["a"], epochs=1, eval_fraction=0.2), tok, data)))
  evl = loader_for(config(data["a"], eval_fraction=0.2), tok, data, split="eval")
  held = all_docs(evl)
  assert 8 <= len(held) <= 30 and len(set(held)) == len(held)
  assert not train & set(held)
  assert len(train) + len(held) == 90
  # The held-out rows do not depend on the training seed.
  other_seed = loader_for(config(data["a"], eval_fraction=0.2), tok, data, split="eval", seed=9)
  assert set(all_docs(other_seed)) == set(held)


def test_named_eval_split_and_eval_batches(tok, data):
  cfg = config(data["a"], eval_split="test")
  cfg.sources = [dict(path={"train": data["a"], "test": data["b"]})]
  held = collections.Counter(all_docs(loader_for(cfg, tok, data, split="eval")))
  expect = collections.Counter(all_docs(loader_for(config(data["b"], epochs=1), tok, data)))
  assert held == expect
  # With eval_batches every process yields exactly that many batches, empty ones after its data.
  natural = [len(list(loader_for(cfg, tok, data, split="eval", process_index=p, process_count=2)))
             for p in range(2)]
  cfg.eval_batches = max(natural) + 2
  seen = collections.Counter()
  for p in range(2):
    batches = list(loader_for(cfg, tok, data, split="eval", process_index=p, process_count=2))
    assert len(batches) == cfg.eval_batches
    for b in batches[natural[p]:]:
      assert not b["segment_ids"].any() and not b["loss_mask"].any()
    seen.update(d for b in batches for d in docs_of(b))
  assert seen == expect


def test_eval_without_eval_data_is_a_clear_error(tok, data):
  with pytest.raises(DataError, match="eval_fraction|eval_split"):
    loader_for(config(data["a"]), tok, data, split="eval")


def test_tokenization_cache_is_reused(tok, data, tmp_path, monkeypatch):
  calls = []
  original = Encoder.encode
  monkeypatch.setattr(Encoder, "encode", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
  cfg = config(data["b"])
  first = loader_for(cfg, tok, data, cache_dir=str(tmp_path))
  assert calls and first.stats["cache"] == {data["b"]: "miss"}
  calls.clear()
  again = loader_for(cfg, tok, data, cache_dir=str(tmp_path))
  assert not calls and again.stats["cache"] == {data["b"]: "hit"}
  assert_batches_equal([next(first)], [next(again)])
  longer = loader_for(cfg, tok, data, cache_dir=str(tmp_path), seq_len=128)  # truncation is after the cache
  assert not calls and longer.stats["cache"] == {data["b"]: "hit"}
  cfg.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
  loader_for(cfg, tok, data, cache_dir=str(tmp_path))  # another template: other tokens, a new entry
  assert calls


def test_worker_processes_encode_the_same(tok, data, tmp_path):
  cfg = config(data["b"], num_workers=2, encode_chunk=16, cache_dir="")
  with_workers = loader_for(cfg, tok, data, cache_dir=None)
  cfg.num_workers = 0
  in_process = loader_for(cfg, tok, data, cache_dir=None)
  assert_batches_equal([next(with_workers) for _ in range(3)], [next(in_process) for _ in range(3)])


def test_state_is_json_and_checks_the_setup(tok, data):
  loader = loader_for(config(data["a"]), tok, data)
  next(loader)
  state = loader.get_state()
  assert json.loads(json.dumps(state)) == state
  other = loader_for(config(data["a"]), tok, data, seq_len=64)
  with pytest.raises(DataError, match="different data setup.*lengths"):
    other.set_state(state)


def test_global_batch(tok, data):
  n = jax.device_count()
  mesh = jax.make_mesh((n, 1, 1), ("data", "fsdp", "tensor"))
  local = next(loader_for(config(data["a"]), tok, data, batch_size=n))
  arrays = global_batch(local, mesh)
  for k, v in local.items():
    assert arrays[k].shape == v.shape and arrays[k].dtype == v.dtype
    assert arrays[k].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(arrays[k]), v)


def test_batch_size_must_split_over_processes(tok, data):
  with pytest.raises(DataError, match="not divisible"):
    loader_for(config(data["a"]), tok, data, batch_size=3, process_index=0, process_count=2)


def test_summary_and_stats(tok, data):
  loader = loader_for(config(data["a"], data["b"]), tok, data)
  s = loader.stats
  assert s["examples"] == 150 and s["rows_read"] == 150 and s["skipped_total"] == 0
  assert s["tokens"] > s["trained_tokens"] > 0
  text = loader.summary()
  assert "150 examples" in text and "a.jsonl" in text and "b.jsonl" in text and "no rows skipped" in text
  # The efficiency reported at start is the one of the rows the loader then yields.
  batches = [next(loader) for _ in range(loader_lib.EFFICIENCY_ROWS // 4)]  # 4 rows per batch
  assert 0.5 < s["packing_efficiency"] <= 1 and s["packing_efficiency"] == packing_efficiency(batches)
  assert f"packing efficiency: {packing_efficiency(batches):.1%} non-padding" in text
