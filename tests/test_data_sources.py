"""Sources (jaxkd.data.sources): TFDS array_record without TensorFlow, local files in every format, streaming.

Each source holds the same rows; the documents a loader yields are compared with the rows tokenized
directly (transformers' apply_chat_template, or the tokenizer on plain text).
"""

import collections
import importlib.util
import json

import numpy as np
import pytest

from jaxkd.data import DataError, default_data_config, make_loader

N = 40


def rows():
  out = []
  for i in range(N):
    out.append({"conversations": [{"from": "human", "value": f"What is {i} + {i}?"},
                                  {"from": "gpt", "value": f"{i} + {i} = {2 * i}."}],
                "text": f"Number {i} doubled is {2 * i}.", "instruction": f"Double {i}.", "input": "",
                "output": f"{2 * i}"})
  return out


def expected_chats(tok, fmt="sharegpt"):
  out = collections.Counter()
  for r in rows():
    if fmt == "sharegpt":
      msgs = [{"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]}
              for m in r["conversations"]]
    else:
      msgs = [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
    out[tuple(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])] += 1
  return out


def documents(cfg, tok, tmp_path, **kw):
  cfg.epochs = 1
  loader = make_loader(cfg, tokenizer=tok, seq_len=64, batch_size=4, seed=0, cache_dir=str(tmp_path / "cache"),
                       **kw)
  docs = collections.Counter()
  for b in loader:
    for r in range(b["segment_ids"].shape[0]):
      seg = b["segment_ids"][r]
      docs.update(tuple(b["input_ids"][r][seg == s].tolist()) for s in range(1, seg.max() + 1))
  return docs, loader


def config(**source):
  cfg = default_data_config()
  cfg.sources = [source]
  return cfg


# ---------------------------------------------------------------------------------------------------------
# TFDS through tfds.data_source over array_record, no TensorFlow
# ---------------------------------------------------------------------------------------------------------


def write_tfds(data_dir):
  import tensorflow_datasets as tfds

  class TinyChat(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "conversations": tfds.features.Sequence({"from": tfds.features.Text(), "value": tfds.features.Text()}),
          "text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(0, 30), "test": self._generate_examples(30, N)}

    def _generate_examples(self, lo, hi):
      for i, r in enumerate(rows()[lo:hi]):
        yield lo + i, {"conversations": r["conversations"], "text": r["text"]}

  TinyChat(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_data_source_without_tensorflow(tok, tmp_path):
  assert importlib.util.find_spec("tensorflow") is None  # the point: TFDS reading works without it
  write_tfds(tmp_path / "tfds")
  want = expected_chats(tok)
  cfg = config(tfds="tiny_chat", data_dir=str(tmp_path / "tfds"), eval_split="test")
  train, loader = documents(cfg, tok, tmp_path)
  held, _ = documents(cfg, tok, tmp_path, split="eval")
  assert train + held == want and len(train) == 30
  assert loader.stats["sources"][0]["format"] == "sharegpt"
  # A prepared dataset folder works as well as a registered name.
  folder, _ = documents(config(tfds=str(tmp_path / "tfds" / "tiny_chat" / "1.0.0")), tok, tmp_path)
  assert folder == train


def test_tfds_missing_dataset_names_the_fix(tok, tmp_path):
  with pytest.raises(DataError, match="array_record"):
    documents(config(tfds="no_such_dataset_here", data_dir=str(tmp_path)), tok, tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Local files through Hugging Face datasets
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["jsonl", "json_glob", "parquet", "csv", "arrow_folder"])
def test_local_files(tok, tmp_path, kind):
  import datasets

  table = rows()
  if kind == "csv":  # csv has no nesting: the Alpaca columns
    for r in table:
      del r["conversations"], r["text"]
  ds = datasets.Dataset.from_list(table)
  if kind == "jsonl":
    path = str(tmp_path / "d.jsonl")
    ds.to_json(path)
  elif kind == "json_glob":
    ds.select(range(20)).to_json(str(tmp_path / "part-0.json"))
    ds.select(range(20, N)).to_json(str(tmp_path / "part-1.json"))
    path = str(tmp_path / "part-*.json")
  elif kind == "parquet":
    path = str(tmp_path / "d.parquet")
    ds.to_parquet(path)
  elif kind == "csv":
    path = str(tmp_path / "d.csv")
    ds.to_csv(path, index=False)
  else:
    path = str(tmp_path / "saved")
    ds.save_to_disk(path)
  docs, loader = documents(config(path=path), tok, tmp_path)
  assert docs == expected_chats(tok, "alpaca" if kind == "csv" else "sharegpt")
  assert loader.stats["sources"][0]["format"] == ("alpaca" if kind == "csv" else "sharegpt")


def test_format_override_and_column_renames(tok, tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps({"dialog": r["conversations"], "text": r["text"]}) + "\n" for r in rows()))
  # Auto-detection sees 'text' (the renamed column wins when given); format=text trains on the plain text.
  docs, _ = documents(config(path=str(path), columns={"conversations": "dialog"}), tok, tmp_path)
  assert docs == expected_chats(tok)
  docs, loader = documents(config(path=str(path), format="text"), tok, tmp_path)
  want = collections.Counter(tuple(tok(r["text"])["input_ids"] + [tok.eos_token_id]) for r in rows())
  assert docs == want
  assert loader.stats["trained_tokens"] == sum(len(d) - 1 for d in want)  # every next token is trained


def test_streaming_reads_everything_and_resumes_exactly(tok, tmp_path):
  path = tmp_path / "s.jsonl"
  path.write_text("".join(json.dumps({"conversations": r["conversations"]}) + "\n" for r in rows()))
  docs, loader = documents(config(path=str(path), streaming=True), tok, tmp_path)
  assert docs == expected_chats(tok) and loader.stats["cache"] == {str(path): "streaming"}
  cfg = config(path=str(path), streaming=True)
  cfg.shuffle_buffer = 8

  def make():
    return make_loader(cfg, tokenizer=tok, seq_len=64, batch_size=2, seed=0, cache_dir=str(tmp_path / "c"))

  ref = make()
  states, batches = [], []
  for _ in range(25):  # past the end of the first pass (about 14 batches)
    states.append(ref.get_state())
    batches.append(next(ref))
  for k in (0, 5, 13, 17):
    fresh = make()
    fresh.set_state(json.loads(json.dumps(states[k])))
    for want in batches[k:k + 6]:
      got = next(fresh)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_offline_hub_dataset_and_tokenizer_name_the_fix(tok, tmp_path, monkeypatch):
  import datasets
  import huggingface_hub

  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  with pytest.raises(DataError, match="hf download"):
    documents(config(path="some-org/some-dataset"), tok, tmp_path)
  from jaxkd.data import load_tokenizer as load
  with pytest.raises(DataError, match="hf download"):
    load("some-org/some-model")
  with pytest.raises(DataError, match="no tokenizer folder"):
    load(str(tmp_path / "missing"))


def test_streaming_mixed_with_map_style(tok, tmp_path):
  stream, local = tmp_path / "stream.jsonl", tmp_path / "local.jsonl"
  stream.write_text("".join(json.dumps({"text": f"stream row {i}."}) + "\n" for i in range(30)))
  local.write_text("".join(json.dumps({"text": f"local row {i}."}) + "\n" for i in range(20)))
  cfg = default_data_config()
  cfg.sources = [dict(path=str(stream), streaming=True, weight=1.0), dict(path=str(local), weight=3.0)]
  cfg.shuffle_buffer = 8  # the window fills before the first example: keep it small for a 30-row stream

  def make(split="train"):
    return make_loader(cfg, tokenizer=tok, seq_len=32, batch_size=2, seed=0, split=split,
                       cache_dir=str(tmp_path / "c"))

  ref = make()
  state = ref.get_state()
  batches = [next(ref) for _ in range(12)]
  fresh = make()
  fresh.set_state(state)
  for want in batches:
    got = next(fresh)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  texts = [tok.decode(b["input_ids"][r][b["segment_ids"][r] == s])
           for b in batches for r in range(2) for s in range(1, b["segment_ids"][r].max() + 1)]
  share = sum("local row" in t for t in texts) / len(texts)
  assert abs(share - 0.75) < 0.1, share
  # Eval over both: every held-out row once, the streamed ones after the others.
  cfg.eval_fraction = 0.3
  held = [tok.decode(b["input_ids"][r][b["segment_ids"][r] == s])
          for b in make("eval") for r in range(2) for s in range(1, b["segment_ids"][r].max() + 1)]
  assert len(held) == len(set(held)) and any("stream" in t for t in held) and any("local" in t for t in held)


def test_streaming_eval_fraction_does_not_depend_on_the_process_count(tok, tmp_path):
  """A streaming source's held-out rows are chosen by content, not by the row's number in one process's
  stream: read by one or two processes, eval holds the same rows, and no process trains on them."""
  path = tmp_path / "s.jsonl"
  path.write_text("".join(json.dumps({"conversations": r["conversations"]}) + "\n" for r in rows()))
  cfg = config(path=str(path), streaming=True)
  cfg.eval_fraction = 0.3

  def docs(split, processes):
    out = collections.Counter()
    for p in range(processes):
      out += documents(cfg, tok, tmp_path / f"{split}{processes}{p}", split=split, process_index=p,
                       process_count=processes)[0]
    return out

  eval_one, eval_two = docs("eval", 1), docs("eval", 2)
  train_one, train_two = docs("train", 1), docs("train", 2)
  assert eval_one == eval_two and 0 < sum(eval_one.values()) < N
  assert train_one == train_two and not set(train_one) & set(eval_one)
  assert train_one + eval_one == expected_chats(tok)
