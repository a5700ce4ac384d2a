"""Packed rows through the model: the forward over a packed row equals separate forwards per document.

Segment ids and positions from the loader must keep documents apart in attention and restart rotary
positions, so each document's logits in a packed row match the logits of that document run on its own
(each alone at the start of its own row; what follows it cannot reach it through causal attention).
"""

import numpy as np
from flax import nnx

from jaxkd.data import TOKENIZER_DIR, default_data_config, load_tokenizer, make_loader
from jaxkd.models import ModelConfig, Transformer


def test_packed_forward_equals_separate_forwards():
  tok = load_tokenizer(TOKENIZER_DIR)
  cfg = default_data_config()
  cfg.packing_bins = 8
  batch = next(make_loader(cfg, tokenizer=tok, seq_len=128, batch_size=2, seed=0, cache_dir=""))
  model = Transformer(ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                                  max_position_embeddings=128), rngs=nnx.Rngs(0))
  forward = nnx.jit(lambda m, ids, seg, pos: m.forward(ids, segment_ids=seg, positions=pos).logits)
  packed = np.asarray(forward(model, batch["input_ids"], batch["segment_ids"], batch["positions"]))
  assert packed.dtype == np.float32

  docs, where = [], []
  for r in range(batch["input_ids"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      where.append((r, seg == s))
      docs.append(batch["input_ids"][r][seg == s])
  assert len(docs) >= 4 and max(seg.max() for seg in batch["segment_ids"]) > 1
  alone_ids = np.zeros((len(docs), 128), np.int32)
  for i, d in enumerate(docs):
    alone_ids[i, :len(d)] = d
  ones = np.ones_like(alone_ids)
  alone = np.asarray(forward(model, alone_ids, ones, np.broadcast_to(np.arange(128), alone_ids.shape)))
  for i, (r, mask) in enumerate(where):
    np.testing.assert_allclose(packed[r][mask], alone[i, :len(docs[i])], rtol=1e-5, atol=1e-5)
