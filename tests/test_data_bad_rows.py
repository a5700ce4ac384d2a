"""Bad rows through the loader: skipped, counted and summarised with their row numbers, or fatal when strict.

The test file plants one bad row of each kind at a known row number among good rows.
"""

import json

import numpy as np
import pytest

from jaxkd.data import DataError, default_data_config, make_loader

GOOD = {"messages": [{"role": "user", "content": "Name 2 colors."},
                     {"role": "assistant", "content": "Red and blue."}]}
BAD = {  # row number -> (row, reason)
    3: ({"id": 3}, "missing_field"),
    5: ({"messages": []}, "empty_conversation"),
    8: ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown_role"),
    13: ({"messages": [{"role": "user", "content": ["a", 1]}, {"role": "assistant", "content": "y"}]},
         "non_string_content"),
    14: ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
         "missing_field"),
    21: ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "no answer"}]},
         "no_trainable_token"),
    34: ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}]},
         "non_string_content"),
}
N = 40


@pytest.fixture(scope="module")
def path(tmp_path_factory):
  p = tmp_path_factory.mktemp("bad") / "rows.jsonl"
  lines = [json.dumps(BAD[i][0] if i in BAD else GOOD) for i in range(N)]
  p.write_text("\n".join(lines) + "\n")
  return str(p)


def make(path, tok, tmp_path, **overrides):
  cfg = default_data_config()
  cfg.sources = [dict(path=path, format="messages")]
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return make_loader(cfg, tokenizer=tok, seq_len=64, batch_size=2, seed=0, cache_dir=str(tmp_path))


def test_bad_rows_are_skipped_counted_and_summarised(path, tok, tmp_path):
  loader = make(path, tok, tmp_path)
  s = loader.stats
  expected = {}
  for _, reason in BAD.values():
    expected[reason] = expected.get(reason, 0) + 1
  assert s["skipped"] == expected
  assert s["skipped_total"] == len(BAD) and s["examples"] == N - len(BAD)
  by_reason = {k: v for src in s["sources"] for k, v in src["skipped"].items()}
  assert by_reason["missing_field"]["rows"] == [3, 14]
  assert by_reason["non_string_content"]["rows"] == [13, 34]
  assert by_reason["unknown_role"]["rows"] == [8] and "'wizard'" in by_reason["unknown_role"]["detail"]
  text = loader.summary()
  assert f"skipped {len(BAD)} rows" in text
  for reason in expected:
    assert reason in text
  assert "(rows 3, 14)" in text and "(rows 21)" in text
  # Nothing fails mid-run: more than an epoch over the file goes through, and it holds the good rows only.
  good = tuple(tok.apply_chat_template(GOOD["messages"], tokenize=True, return_dict=True)["input_ids"])
  for _ in range(N):
    b = next(loader)
    assert np.isfinite(b["loss_mask"]).all()
    docs = [tuple(b["input_ids"][r][b["segment_ids"][r] == d].tolist())
            for r in range(b["segment_ids"].shape[0]) for d in range(1, b["segment_ids"][r].max() + 1)]
    assert docs and set(docs) == {good}


def test_strict_mode_names_the_first_bad_row(path, tok, tmp_path):
  with pytest.raises(DataError, match=r"rows\.jsonl row 3: missing_field: no 'messages' field.*strict"):
    make(path, tok, tmp_path / "fresh", strict=True)
  make(path, tok, tmp_path / "cached")  # a non-strict run caches the share ...
  with pytest.raises(DataError, match="row 3: missing_field"):  # ... and strict still refuses it
    make(path, tok, tmp_path / "cached", strict=True)


def test_a_file_of_only_bad_rows_is_an_error_not_a_silent_zero_loss(tok, tmp_path):
  p = tmp_path / "all_bad.jsonl"
  p.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
  with pytest.raises(DataError, match="no usable train rows.*no_trainable_token"):
    make(str(p), tok, tmp_path)
