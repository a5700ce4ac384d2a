"""The model ports against transformers' PyTorch forward, the exporter, and the parameter counts."""

import copy
import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx

from jaxkd import data, models, sharding
from jaxkd.models import presets
from tests import hf_models

FAMILY_CONFIGS = sorted(hf_models.CONFIGS)


def _ids(seed, b=2, t=12):
  return np.random.RandomState(seed).randint(0, hf_models.V, (b, t)).astype(np.int32)


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_logits_match_transformers(hf_factory, name):
  folder = hf_factory(name)
  model = models.from_pretrained(folder)
  ids = _ids(1)
  ref = hf_models.torch_logits(folder, ids)
  diff = np.abs(np.asarray(model(ids)) - ref).max()
  print(f"{name}: max |jax - torch| = {diff:.2e}")
  assert diff <= 1e-4


@pytest.mark.parametrize("name", ["qwen2_tied", "llama_gqa_llama3", "stablelm_full", "qwen3_tied_bias"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_transformers_with_padding(hf_factory, name, side):
  folder = hf_factory(name)
  model = models.from_pretrained(folder)
  ids = _ids(2, t=10)
  mask = np.ones_like(ids)
  if side == "right":
    mask[0, 6:] = 0
  else:
    mask[0, :4] = 0
  # Real tokens count positions from 0 in both implementations.
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  ref = hf_models.torch_logits(folder, ids, attention_mask=mask, position_ids=positions)
  ours = np.asarray(model(ids, attention_mask=mask))
  real = mask.astype(bool)
  diff = np.abs(ours[real] - ref[real]).max()
  print(f"{name} {side} padding: max |jax - torch| over real tokens = {diff:.2e}")
  assert diff <= 1e-4
  # The unpadded row is unaffected by its neighbour's padding.
  np.testing.assert_allclose(ours[1], np.asarray(model(ids[1:]))[0], atol=1e-5)


@pytest.mark.parametrize("name", ["qwen2_untied", "stablelm_full"])
def test_hidden_states_match_transformers(hf_factory, name):
  folder = hf_factory(name)
  model = models.from_pretrained(folder)
  ids = _ids(3)
  _, ref = hf_models.torch_logits(folder, ids, output_hidden_states=True)
  out = model.forward(ids, output_hidden_states=True)
  assert out.hidden_states.shape[0] == len(ref) == hf_models.L + 1
  for i, h in enumerate(ref):
    assert np.abs(np.asarray(out.hidden_states[i]) - h).max() <= 1e-4, f"hidden state {i}"
  np.testing.assert_allclose(np.asarray(out.last_hidden), ref[-1], atol=1e-4)


@pytest.mark.parametrize("rows", ["hand_packed", "loader"])
def test_packed_row_equals_separate_documents(hf_factory, tok, rows):
  """Segment ids keep packed documents apart: a document's logits in a packed row equal its logits run alone, at
  the start of a row of its own (what follows it cannot reach it through causal attention). Hand-packed
  documents through a transformers-made StableLM, positions derived from the segment ids; a loader's packed
  batch through a Llama, with the positions the loader gives. (Rotary attention sees only relative positions,
  so this does not check that positions restart; test_data_packing.py checks the loader's positions.)"""
  if rows == "hand_packed":
    model = models.from_pretrained(hf_factory("stablelm_full"))
    docs = [_ids(4, b=1, t=5)[0], _ids(5, b=1, t=4)[0], _ids(6, b=1, t=3)[0]]
    ids_BxT = np.concatenate(docs + [np.zeros(2, np.int32)])[None]
    seg_BxT = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)] + [np.zeros(2)])[None]
    seg_BxT, pos_BxT, min_docs, tol = seg_BxT.astype(np.int32), None, 3, dict(rtol=0, atol=1e-5)
  else:
    cfg = data.default_data_config()
    cfg.packing_bins = 8
    batch = next(data.make_loader(cfg, tokenizer=tok, seq_len=128, batch_size=2, seed=0, cache_dir=""))
    model = models.Transformer(models.ModelConfig(
        model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, max_position_embeddings=128), rngs=nnx.Rngs(0))
    ids_BxT, seg_BxT, pos_BxT = batch["input_ids"], batch["segment_ids"], batch["positions"]
    min_docs, tol = 4, dict(rtol=1e-5, atol=1e-5)
  forward = nnx.jit(lambda m, ids, seg, pos: m.forward(ids, segment_ids=seg, positions=pos).logits)
  packed = np.asarray(forward(model, ids_BxT, seg_BxT, pos_BxT))
  assert packed.dtype == np.float32

  docs, where = [], []
  for r, seg in enumerate(seg_BxT):
    for s in range(1, seg.max() + 1):
      where.append((r, seg == s))
      docs.append(ids_BxT[r][seg == s])
  assert len(docs) >= min_docs and seg_BxT.max() > 1
  t = ids_BxT.shape[1]
  alone_ids = np.zeros((len(docs), t), np.int32)
  for i, d in enumerate(docs):
    alone_ids[i, :len(d)] = d
  ones = np.ones_like(alone_ids)
  alone = np.asarray(forward(model, alone_ids, ones, np.broadcast_to(np.arange(t), alone_ids.shape)))
  for i, (r, mask) in enumerate(where):
    np.testing.assert_allclose(packed[r][mask], alone[i, :len(docs[i])], **tol)


def test_bf16_loading(hf_factory):
  """bf16 parameters and compute: logits within 3% of the logit range of the float32 reference."""
  folder = hf_factory("qwen2_untied")
  model = models.from_pretrained(folder, dtype="bfloat16")
  leaves = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  assert all(x.dtype == jnp.bfloat16 for x in leaves)
  ids = _ids(7)
  ref = hf_models.torch_logits(folder, ids)
  ours = np.asarray(model(ids)).astype(np.float32)
  err = np.abs(ours - ref).max() / np.abs(ref).max()
  print(f"bf16: max error / max |logit| = {err:.3e}")
  assert err <= 3e-2
  assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("name", ["qwen2_tied", "qwen2_head_dim", "llama_bias_linear", "stablelm_full",
                                  "llama_yarn", "qwen3_untied", "qwen3_tied_bias"])
def test_export_reloads_in_transformers(hf_factory, tmp_path, name):
  model = models.from_pretrained(hf_factory(name))
  out = models.save_pretrained(model, str(tmp_path / "export"))
  reloaded, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  ids = _ids(8)
  with torch.no_grad():
    ref = reloaded.eval()(torch.tensor(ids)).logits.numpy()
  diff = np.abs(np.asarray(model(ids)) - ref).max()
  print(f"{name}: export -> transformers max diff {diff:.2e}")
  assert diff <= 1e-4
  # and back into jaxkd, bit for bit
  again = models.from_pretrained(out)
  np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))


def test_sharded_export_with_index_and_tokenizer(hf_factory, tmp_path):
  model = models.from_pretrained(hf_factory("llama_gqa_llama3"))
  tok = _tokenizer()
  out = models.save_pretrained(model, str(tmp_path / "sharded"), tokenizer=tok, max_shard_size=20_000,
                               dtype="bfloat16")
  files = sorted(os.listdir(out))
  assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
  assert "tokenizer.json" in files or "tokenizer_config.json" in files
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  reloaded, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  ours = models.from_pretrained(out, dtype="auto")
  assert ours.embed_tokens.embedding.get_value().dtype == jnp.bfloat16
  ids = _ids(9)
  with torch.no_grad():
    ref = reloaded.float().eval()(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(models.from_pretrained(out)(ids)), ref, atol=1e-4)


def _tokenizer():
  from tokenizers import Tokenizer, models as tm, pre_tokenizers  # pylint: disable=import-outside-toplevel
  vocab = {f"t{i}": i for i in range(hf_models.V)}
  vocab["[UNK]"] = hf_models.V
  raw = Tokenizer(tm.WordLevel(vocab, unk_token="[UNK]"))
  raw.pre_tokenizer = pre_tokenizers.Whitespace()
  return tf.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")


@pytest.mark.parametrize("name", ["qwen2_untied", "qwen3_untied"])
def test_loading_onto_a_mesh(hf_factory, name):
  """With a mesh each parameter lands on its NamedSharding; the logits do not change."""
  folder = hf_factory(name)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  model = models.from_pretrained(folder, mesh=mesh)
  cfg, P = model.cfg, jax.sharding.PartitionSpec
  q = model.layers.self_attn.q_proj.kernel.get_value()
  assert q.sharding.spec == P(None, "fsdp", "tensor")
  assert model.embed_tokens.embedding.get_value().sharding.spec == P(None, "fsdp")  # 101 % 4
  assert len(q.addressable_shards) == 8
  assert q.addressable_shards[0].data.shape == (cfg.num_layers, cfg.hidden_size // 2, cfg.num_heads * cfg.head_dim // 4)
  if cfg.qk_norm == "shared":  # Qwen3's [layers, head_dim] q/k norm weights: whole on every device
    for norm in (model.layers.self_attn.q_norm, model.layers.self_attn.k_norm):
      value = norm.scale.get_value()
      assert value.shape == (cfg.num_layers, cfg.head_dim) and value.sharding.is_fully_replicated
  ids = _ids(10)
  with jax.set_mesh(mesh):
    sharded = np.asarray(jax.jit(lambda m, x: m(x))(model, ids))
  np.testing.assert_allclose(sharded, np.asarray(models.from_pretrained(folder)(ids)), atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Real configs, abstractly.

REAL_COUNTS = {
    "Qwen/Qwen2-1.5B": 1_543_714_304,
    "Qwen/Qwen2-7B": 7_615_616_512,
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "meta-llama/Llama-3.1-70B": 70_553_706_496,
    "stabilityai/stablelm-2-1_6b": 1_644_515_328,
    # The hub pages say 0.6B, 1.7B, 4B, 8B, 32B; their safetensors count for 1.7B, 2.03B, includes a stored copy of
    # the tied embedding table as lm_head.weight (a tied model has no parameter of its own there).
    "Qwen/Qwen3-0.6B": 596_049_920,
    "Qwen/Qwen3-1.7B": 1_720_574_976,
    "Qwen/Qwen3-4B": 4_022_468_096,
    "Qwen/Qwen3-8B": 8_190_735_360,
    "Qwen/Qwen3-32B": 32_762_123_264,
}


@pytest.mark.parametrize("hub_id", sorted(REAL_COUNTS))
def test_real_config_parameter_counts(hub_id):
  cfg = models.config_from_hf(presets.PRESETS[hub_id])
  abstract = nnx.eval_shape(lambda: models.Transformer(cfg, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  leaves = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))]
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
  ours = sum(int(np.prod(x.shape)) for x in leaves)
  # transformers' own count, on the meta device (no memory either)
  with torch.device("meta"):
    hf = copy.deepcopy(presets.PRESETS[hub_id])  # transformers edits rope_scaling in place
    ref_model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(**hf))
  theirs = sum(p.numel() for p in ref_model.parameters())
  assert ours == theirs == REAL_COUNTS[hub_id]


# The Qwen3 model cards' "Number of Parameters" and "(Non-Embedding)" in billions, as printed there: an account of
# the presets (written without the hub) that does not come from them. Non-embedding leaves out the embedding table
# and the output head.
QWEN3_CARDS = {"Qwen/Qwen3-0.6B": ("0.6", "0.44"), "Qwen/Qwen3-1.7B": ("1.7", "1.4"), "Qwen/Qwen3-4B": ("4.0", "3.6"),
               "Qwen/Qwen3-8B": ("8.2", "6.95"), "Qwen/Qwen3-32B": ("32.8", "31.2")}


@pytest.mark.parametrize("hub_id", sorted(QWEN3_CARDS))
def test_qwen3_presets_have_their_model_cards_parameter_counts(hub_id):
  cfg = models.config_from_hf(presets.PRESETS[hub_id])
  table = cfg.vocab_size * cfg.hidden_size
  non_embedding = REAL_COUNTS[hub_id] - table * (1 if cfg.tie_embeddings else 2)
  for count, printed in zip((REAL_COUNTS[hub_id], non_embedding), QWEN3_CARDS[hub_id]):
    decimals = len(printed.split(".")[1])
    assert f"{count / 1e9:.{decimals}f}" == printed, (hub_id, count, printed)


# ----------------------------------------------------------------------------------------------------
# Bad inputs.


def _copy(folder, dst):
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.copytree(folder, dst)
  return str(dst)


def test_missing_weight_is_named(hf_factory, tmp_path):
  folder = _copy(hf_factory("qwen2_untied"), tmp_path / "m")
  hf_models.rewrite_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(models.WeightsError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
    models.from_pretrained(folder)


def test_unexpected_weight_is_named(hf_factory, tmp_path):
  folder = _copy(hf_factory("qwen2_untied"), tmp_path / "m")
  hf_models.rewrite_weights(folder, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(32)}))
  with pytest.raises(models.WeightsError, match=r"unexpected.*o_proj\.bias"):
    models.from_pretrained(folder)


def test_wrong_shape_is_named(hf_factory, tmp_path):
  folder = _copy(hf_factory("llama_gqa_llama3"), tmp_path / "m")
  hf_models.edit_config(folder, intermediate_size=48)
  with pytest.raises(models.WeightsError, match=r"mlp\.(gate|up|down)_proj\.weight has shape \((64, 32|32, 64)\) but config.json implies \((48, 32|32, 48)\)"):
    models.from_pretrained(folder)


def test_tied_config_with_a_different_lm_head_is_refused(hf_factory, tmp_path):
  """transformers 5 would untie and use lm_head.weight; a tied model would drop it: neither silently."""
  folder = _copy(hf_factory("qwen2_tied"), tmp_path / "m")
  hf_models.rewrite_weights(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
  models.from_pretrained(folder)  # a copy of the embedding table is harmless
  hf_models.rewrite_weights(folder, lambda t: t["lm_head.weight"][5].add_(1.0))
  with pytest.raises(models.WeightsError, match=r"tie_word_embeddings=true.*lm_head\.weight, which differs "
                                                   r"from model\.embed_tokens\.weight.*tie_word_embeddings to false"):
    models.from_pretrained(folder)


def test_index_naming_the_wrong_shard_is_named(hf_factory, tmp_path):
  model = models.from_pretrained(hf_factory("qwen2_tied"))
  out = models.save_pretrained(model, str(tmp_path / "s"), max_shard_size=30_000)
  index = os.path.join(out, "model.safetensors.index.json")
  with open(index) as f:
    meta = json.load(f)
  shards = sorted(set(meta["weight_map"].values()))
  name = next(n for n, s in meta["weight_map"].items() if s == shards[0])
  meta["weight_map"][name] = shards[1]
  with open(index, "w") as f:
    json.dump(meta, f)
  with pytest.raises(models.WeightsError, match=rf"maps weight {re.escape(name)} to {shards[1]}, which does "
                                                   "not hold it"):
    models.from_pretrained(out)


def test_missing_shard_is_named(hf_factory, tmp_path):
  model = models.from_pretrained(hf_factory("qwen2_tied"))
  out = models.save_pretrained(model, str(tmp_path / "s"), max_shard_size=30_000)
  second = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))[1]
  os.remove(os.path.join(out, second))
  with pytest.raises(models.WeightsError, match=rf"lists shard {second}, which is not in"):
    models.from_pretrained(out)


def test_truncated_shard_is_named(hf_factory, tmp_path):
  folder = _copy(hf_factory("qwen2_tied"), tmp_path / "m")
  hf_models.truncate_weights(folder)
  with pytest.raises(models.WeightsError, match=r"model\.safetensors is truncated"):
    models.from_pretrained(folder)


def test_pickle_only_folder_is_refused(hf_factory, tmp_path):
  folder = _copy(hf_factory("qwen2_tied"), tmp_path / "m")
  os.remove(os.path.join(folder, "model.safetensors"))
  torch.save({"x": torch.zeros(1)}, os.path.join(folder, "pytorch_model.bin"))
  with pytest.raises(models.WeightsError, match=r"only pickle weights.*never unpickles"):
    models.from_pretrained(folder)


def test_hub_id_offline_says_how_to_fix(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(FileNotFoundError, match=r"huggingface-cli download jaxkd-test/no-such-model"):
    models.from_pretrained("jaxkd-test/no-such-model")


@pytest.mark.parametrize("changes,match", [
    ({"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1, "layer_types": None},
     r"layers \[1\] 'sliding_attention'.*use_sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, r"layer_types.*sliding"),
    ({"rope_parameters": {"rope_type": "longrope", "factor": 2.0}}, r"rope_type='longrope'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, r"rope_parameters.*rope_scaling.*disagree"),
    ({"model_type": "gpt2"}, r"model_type='gpt2' is not supported"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
    ({"attention_dropout": 0.1}, r"attention_dropout"),
])
def test_unsupported_config_fields_are_named(hf_factory, tmp_path, changes, match):
  folder = _copy(hf_factory("qwen2_tied"), tmp_path / "m")
  hf_models.edit_config(folder, **changes)
  with pytest.raises(models.UnsupportedConfigError, match=match):
    models.from_pretrained(folder)


def test_sliding_window_switched_on_but_used_by_no_layer_loads(hf_factory, tmp_path):
  """use_sliding_window with max_window_layers >= the depth: transformers makes every layer full attention."""
  folder = _copy(hf_factory("qwen2_tied"), tmp_path / "m")
  hf_models.edit_config(folder, use_sliding_window=True, sliding_window=8, max_window_layers=2, layer_types=None)
  plain = models.from_pretrained(hf_factory("qwen2_tied")).cfg
  loaded = models.from_pretrained(folder).cfg
  assert dataclasses.replace(loaded, hf_passthrough=()) == dataclasses.replace(plain, hf_passthrough=())


def test_qwen3_config_reading():
  """What Qwen3Config decides without the field: head_dim 128 (not hidden / heads), no bias; sliding-window layers
  from use_sliding_window and max_window_layers are refused as for Qwen2; the export's config says the same."""
  bare = {k: v for k, v in presets.PRESETS["Qwen/Qwen3-8B"].items() if k not in ("head_dim", "attention_bias")}
  bare.update(hidden_size=256, num_attention_heads=8)
  cfg, theirs = models.config_from_hf(bare), tf.Qwen3Config(**bare)
  assert (cfg.head_dim, cfg.qkv_bias, cfg.o_bias, cfg.qk_norm) == (theirs.head_dim, False, False, "shared") == (
      128, False, False, "shared")
  assert models.config_from_hf(models.config_to_hf(cfg, "bfloat16")) == cfg
  with pytest.raises(models.UnsupportedConfigError, match=r"layers \[34, 35\] 'sliding_attention'"):
    models.config_from_hf({**bare, "use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 34})


def test_both_config_spellings_give_the_same_model():
  """Hub configs (top-level rope_theta, rope_scaling, partial_rotary_factor, torch_dtype) and
  transformers 5 configs (rope_parameters, dtype) describe the same model."""
  hub = presets.PRESETS["stabilityai/stablelm-2-1_6b"]
  new = {k: v for k, v in hub.items() if k not in ("rope_theta", "partial_rotary_factor", "torch_dtype")}
  new.update(rope_parameters={"rope_type": "default", "rope_theta": 10000, "partial_rotary_factor": 0.25},
             dtype="bfloat16")
  assert models.config_from_hf(hub) == models.config_from_hf(new)
  llama = presets.PRESETS["meta-llama/Llama-3.1-8B"]
  llama_new = {k: v for k, v in llama.items() if k not in ("rope_theta", "rope_scaling")}
  llama_new["rope_parameters"] = {**llama["rope_scaling"], "rope_theta": llama["rope_theta"]}
  assert models.config_from_hf(llama) == models.config_from_hf(llama_new)
  assert models.config_from_hf(llama).rope.type == "llama3"
