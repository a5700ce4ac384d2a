"""Packed batches (jaxkd.data.packing through the loader): row invariants, masks, truncation and drop counts.

References are computed without the pipeline: token lengths and assistant masks come from transformers'
`apply_chat_template` (with a generation-marked copy of the bundled ChatML template for the masks).
"""

import json

import numpy as np
import pytest

from jaxkd.data import default_data_config, make_loader
from tests.data_references import GENERATION_CHATML, packing_efficiency


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
  """A small messages-format file: 150 bundled chats (some long with tool calls)."""
  from jaxkd.data import CHAT_MESSAGES

  with open(CHAT_MESSAGES) as f:
    rows = [json.loads(line) for _, line in zip(range(150), f)]
  path = tmp_path_factory.mktemp("packing") / "chats.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path), [r["messages"] for r in rows]


def reference(tok, messages):
  """(ids, trained mask) from transformers alone."""
  out = tok.apply_chat_template(messages, chat_template=GENERATION_CHATML, tokenize=True, return_dict=True,
                                return_assistant_tokens_mask=True)
  return list(out["input_ids"]), list(out["assistant_masks"])


def one_epoch(path, tok, tmp_path, seq_len, **overrides):
  cfg = default_data_config()
  cfg.sources = [dict(path=path)]
  cfg.epochs = 1
  for k, v in overrides.items():
    setattr(cfg, k, v)
  loader = make_loader(cfg, tokenizer=tok, seq_len=seq_len, batch_size=4, seed=1, cache_dir=str(tmp_path))
  return loader, list(loader)


def documents(batch):
  """Per document: (ids, targets, loss_mask, positions) sliced out of each row by segment id."""
  docs = []
  for r in range(batch["segment_ids"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      where = seg == s
      docs.append(tuple(batch[k][r][where] for k in ("input_ids", "targets", "loss_mask", "positions")))
  return docs


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_row_invariants(chats, tok, tmp_path, train_on):
  path, _ = chats
  # train_on="all" trains every document's first token too: a mask leaking across documents would show.
  loader, batches = one_epoch(path, tok, tmp_path, seq_len=128, train_on=train_on)
  assert batches, "no batches"
  for b in batches:
    assert set(b) == {"input_ids", "targets", "loss_mask", "segment_ids", "positions"}
    assert all(v.shape == (4, 128) for v in b.values())
    assert b["input_ids"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
    for r in range(4):
      seg, pos = b["segment_ids"][r], b["positions"][r]
      real = seg > 0
      n = real.sum()
      assert real[:n].all() and not real[n:].any(), "padding only at the end of a row"
      assert (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all()
      if n:
        assert seg[0] == 1
      for s in range(1, seg.max() + 1):
        np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
      # Targets: the next token of the same document, else 0; the mask never crosses documents or padding.
      same = np.zeros(128, bool)
      same[:-1] = (seg[1:] == seg[:-1]) & real[:-1]
      expected = np.zeros(128, np.int32)
      expected[:-1] = np.where(same[:-1], b["input_ids"][r][1:], 0)
      np.testing.assert_array_equal(b["targets"][r], expected)
      assert not b["loss_mask"][r][~same].any()
      assert not b["input_ids"][r][~real].any() and not b["positions"][r][~real].any()
  assert 0.5 < loader.stats["packing_efficiency"] <= 1.0
  assert loader.stats["packing_efficiency"] == packing_efficiency(batches)  # of the rows it then yields
  assert "packing efficiency" in loader.summary()


def test_every_document_and_its_mask_match_transformers(chats, tok, tmp_path):
  path, conversations = chats
  _, batches = one_epoch(path, tok, tmp_path, seq_len=512)  # long enough that nothing is truncated
  want = {}
  for messages in conversations:
    ids, mask = reference(tok, messages)
    want.setdefault(tuple(ids), []).append(mask)
  seen = 0
  for b in batches:
    for ids, targets, loss_mask, _ in documents(b):
      masks = want[tuple(ids.tolist())]  # KeyError: a document that is no example
      mask = masks.pop()
      # loss_mask[t] says whether targets[t] = ids[t + 1] is trained: the reference mask shifted by one.
      np.testing.assert_array_equal(loss_mask, np.asarray(mask[1:] + [0], np.float32))
      seen += 1
  assert seen == len(conversations) and not any(want.values())


def test_truncation_and_drop_counts(chats, tok, tmp_path):
  path, conversations = chats
  seq_len = 48
  refs = [reference(tok, m) for m in conversations]
  over = [len(ids) > seq_len for ids, _ in refs]
  trainable_in_window = [any(mask[1:seq_len]) for _, mask in refs]
  n_truncated = sum(o and t for o, t in zip(over, trainable_in_window))
  n_nothing_left = sum(o and not t for o, t in zip(over, trainable_in_window))
  assert n_truncated and n_nothing_left, "the test data should exercise both cases"

  loader, batches = one_epoch(path, tok, tmp_path, seq_len=seq_len, overlong="truncate")
  s = loader.stats
  assert s["truncated"] == n_truncated
  assert s["skipped"].get("no_trainable_token_after_truncation") == n_nothing_left
  assert s["examples"] == len(conversations) - n_nothing_left
  assert sum(len(documents(b)) for b in batches) == s["examples"]
  truncated_docs = [d for b in batches for d in documents(b) if len(d[0]) == seq_len]
  assert len(truncated_docs) >= n_truncated

  loader, batches = one_epoch(path, tok, tmp_path, seq_len=seq_len, overlong="drop")
  s = loader.stats
  assert s["dropped"] == sum(over) and s["truncated"] == 0
  assert s["examples"] == len(conversations) - sum(over)
  kept = sorted(tuple(d[0].tolist()) for b in batches for d in documents(b))
  assert kept == sorted(tuple(ids) for (ids, _), o in zip(refs, over) if not o)
  assert f"{sum(over)} dropped" in loader.summary()
