"""Two tokenizers (jaxkd.data.tokenizer, encode.align): sameness by content, teacher rows and alignment.

The teacher is a BPE trained on the same text with a smaller vocabulary, so its merges differ. Alignment
pairs are checked against character ends computed independently by decoding growing prefixes of each
document: a pair is right when both prefixes decode to the same text, and complete when every such
position is a pair.
"""

import json

import numpy as np
import pytest

from jaxkd.data import (CHAT_MESSAGES, TOKENIZER_DIR, default_data_config, load_tokenizer, make_loader,
                        same_tokenizer, tokenizer_fingerprint)
from jaxkd.data.synthetic import make_conversations, tokenizer_corpus, train_tokenizer
from tests.data_references import align_coverage


@pytest.fixture(scope="module")
def student():
  return load_tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  tok = train_tokenizer(tokenizer_corpus(make_conversations(7, 600)), vocab_size=420)
  folder = tmp_path_factory.mktemp("teacher_tok")
  tok.save_pretrained(folder)
  return load_tokenizer(str(folder))


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
  with open(CHAT_MESSAGES) as f:
    rows = [json.loads(line) for _, line in zip(range(80), f)]
  # Non-ASCII content: byte-level tokens that split a character must still align on its end.
  rows.append({"messages": [{"role": "user", "content": "Café or thé? 🙂"},
                            {"role": "assistant", "content": "Thé, naturellement — 🙂🙂"}]})
  path = tmp_path_factory.mktemp("tok_data") / "chats.jsonl"
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
  return str(path)


def test_same_tokenizer_is_decided_by_content(student, teacher, tmp_path):
  copy = load_tokenizer(TOKENIZER_DIR)
  copy.chat_template = "{{ messages }}"  # a template, a name or a max length is not the tokenizer
  copy.model_max_length = 123
  copy.save_pretrained(tmp_path / "renamed_copy")
  assert same_tokenizer(student, load_tokenizer(str(tmp_path / "renamed_copy")))
  assert not same_tokenizer(student, teacher)
  # One changed merge is a different tokenizer.
  spec = json.loads(student.backend_tokenizer.to_str())
  merges = spec["model"]["merges"]
  merges[-1], merges[-2] = merges[-2], merges[-1]
  from tokenizers import Tokenizer
  from transformers import PreTrainedTokenizerFast
  swapped = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
  assert tokenizer_fingerprint(swapped) != tokenizer_fingerprint(student)


def loader(chats, student, teacher, tmp_path, **overrides):
  cfg = default_data_config()
  cfg.sources = [dict(path=chats)]
  cfg.epochs = 1
  cfg.teacher_seq_len = 320  # the teacher's smaller vocabulary needs more tokens: room for every document
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return make_loader(cfg, tokenizer=student, teacher_tokenizer=teacher, seq_len=160, batch_size=4, seed=0,
                     cache_dir=str(tmp_path))


def test_same_teacher_tokenizer_adds_nothing(chats, student, tmp_path):
  batch = next(loader(chats, student, load_tokenizer(TOKENIZER_DIR), tmp_path))
  assert not any(k.startswith(("teacher", "align")) for k in batch)


def char_ends(tok, ids):
  """End (in characters of the decoded document) of each token whose prefix decodes to whole characters."""
  ends = {}
  for i in range(len(ids)):
    text = tok.decode(ids[:i + 1])
    if "\ufffd" not in text:  # a prefix ending inside a multi-byte character decodes to U+FFFD
      ends[i] = text
  return ends


def teacher_documents(batch):
  for r in range(batch["segment_ids"].shape[0]):
    seg, tseg = batch["segment_ids"][r], batch["teacher_segment_ids"][r]
    pairs = [(int(s), int(t)) for s, t, m in zip(batch["align_student"][r], batch["align_teacher"][r],
                                                 batch["align_mask"][r]) if m]
    for d in range(1, seg.max() + 1):
      s_idx, t_idx = np.flatnonzero(seg == d), np.flatnonzero(tseg == d)
      local = [(s - s_idx[0], t - t_idx[0]) for s, t in pairs if seg[s] == d]
      assert all(tseg[t] == d for s, t in pairs if seg[s] == d), "a pair crosses documents"
      yield batch["input_ids"][r][s_idx], batch["teacher_input_ids"][r][t_idx], local


def test_alignment_pairs_are_exactly_the_common_character_ends(chats, student, teacher, tmp_path):
  ld = loader(chats, student, teacher, tmp_path)
  batches = list(ld)
  n_docs = n_pairs = 0
  for batch in batches:
    assert batch["teacher_input_ids"].shape == (4, 320) and batch["align_student"].shape == (4, 160)
    assert batch["teacher_positions"].dtype == np.int32 and batch["align_mask"].dtype == np.float32
    for s_ids, t_ids, pairs in teacher_documents(batch):
      assert student.decode(s_ids) == teacher.decode(t_ids)  # the same document on both sides
      s_ends, t_ends = char_ends(student, s_ids), char_ends(teacher, t_ids)
      expected = {(i, j) for i, a in s_ends.items() for j, b in t_ends.items() if a == b}
      # Zero-width tokens have no end of their own; neither tokenizer here has any.
      assert set(pairs) == expected
      assert len(pairs) == len(set(i for i, _ in pairs)) == len(set(j for _, j in pairs))
      n_docs += 1
      n_pairs += len(pairs)
  assert n_docs == 81 and n_pairs > 81 * 10
  assert ld.stats["teacher_tokenizer_differs"] and "teacher tokenizer differs" in ld.summary()
  # The coverage reported at start is the one of the rows the loader then yields.
  assert ld.stats["align_coverage"] == align_coverage(batches)
  assert f"{align_coverage(batches):.0%} of student tokens end where a teacher token ends" in ld.summary()


TEACHER_TEMPLATE = ("{%- for m in messages %}"
                    "{{- '### ' + m['role'] | capitalize + ':\\n' + m['content'] + '\\n\\n' }}"
                    "{%- endfor %}")


def contents_so_far(prefix: str, template: str) -> str:
  """The message text a prefix of a rendered conversation has covered, template markup removed."""
  import re

  if template == "chatml":
    parts = re.split(r"<\|im_start\|>\w+\n|<\|im_end\|>\n?", prefix)
  else:
    parts = re.split(r"### \w+:\n|\n\n", prefix)
  return "\x00".join(p for p in parts if p)


def test_alignment_across_templates_pairs_the_same_message_text(chats, student, teacher, tmp_path):
  # The teacher renders its own template: pairs then sit on message text, at the same place of the same turn.
  ld = loader(chats, student, teacher, tmp_path, teacher_chat_template=TEACHER_TEMPLATE)
  count = 0
  for batch in ld:
    for s_ids, t_ids, pairs in teacher_documents(batch):
      assert teacher.decode(t_ids).startswith("### ")
      for i, j in pairs:
        s_text = contents_so_far(student.decode(s_ids[:i + 1]), "chatml")
        t_text = contents_so_far(teacher.decode(t_ids[:j + 1]), "teacher")
        assert s_text == t_text, (i, j)
        count += 1
  assert count > 500


def test_teacher_overflow_is_truncated_or_dropped_and_counted(chats, student, teacher, tmp_path):
  # The teacher's smaller vocabulary needs more tokens: with a short teacher row some examples overflow.
  full = loader(chats, student, teacher, tmp_path)
  lengths = [len(t_ids) for b in full for _, t_ids, _ in teacher_documents(b)]
  limit = int(np.percentile(lengths, 80))
  over = sum(n > limit for n in lengths)
  dropped = loader(chats, student, teacher, tmp_path, teacher_seq_len=limit, overlong="drop")
  assert dropped.stats["dropped"] == over and dropped.stats["examples"] == len(lengths) - over
  batch = next(dropped)
  assert batch["teacher_input_ids"].shape == (4, limit)
  truncated = loader(chats, student, teacher, tmp_path, teacher_seq_len=limit)
  assert truncated.stats["truncated"] >= over and truncated.stats["examples"] == len(lengths)
  for b in truncated:  # pairs cut off by the truncation are gone; the rest still index the rows
    assert (b["align_teacher"][b["align_mask"] > 0] < limit).all()


def test_alignment_when_only_the_teacher_template_trims(student, teacher):
  """A message with surrounding whitespace: the student's ChatML keeps it, the teacher's template trims it.
  Token ends are compared relative to the trimmed content on both sides, so every pair joins tokens that end
  at the same character of the reply, and every common end within the reply is a pair."""
  from jaxkd.data import CHATML_TEMPLATE  # pylint: disable=import-outside-toplevel
  from jaxkd.data.encode import Encoder, Side  # pylint: disable=import-outside-toplevel
  from jaxkd.data.formats import to_example  # pylint: disable=import-outside-toplevel

  trim = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] | trim + '<|im_end|>\\n' }}{%- endfor %}")
  s_side, t_side = Side(student, CHATML_TEMPLATE), Side(teacher, trim, name="teacher")
  reply = "The apple is red, the pear is green."
  row = {"messages": [{"role": "user", "content": "Name a fruit."},
                      {"role": "assistant", "content": "  " + reply + "\n"}]}
  pairs = Encoder(s_side, t_side).encode([row], "messages", [0]).align.tolist()
  ex = to_example(row, "messages")
  ends = {}
  for side, who in ((s_side, "s"), (t_side, "t")):
    text = side.render(ex, "assistant").text
    start = text.index(reply)
    offsets = side.backend.encode(text, add_special_tokens=False).offsets
    ends[who] = [e - start for _, e in offsets]  # token ends relative to the trimmed reply
  in_reply = [(i, j) for i, j in pairs if 0 < ends["s"][i] <= len(reply)]
  assert all(ends["s"][i] == ends["t"][j] for i, j in in_reply), [(ends["s"][i], ends["t"][j]) for i, j in in_reply]
  common = {e for e in ends["s"] if 0 < e <= len(reply)} & {e for e in ends["t"] if 0 < e <= len(reply)}
  assert sorted(ends["s"][i] for i, _ in in_reply) == sorted(common) and len(common) > 3


def test_dropped_alignment_pairs_are_counted_for_the_rows_handed_out(chats, student, teacher, tmp_path):
  """max_align caps the pairs per row; stats["align_pairs_dropped"] counts those cut, for the batches given
  out so far: not for the rows the loader measured at start, packed ahead, or packed again on resume."""
  full = loader(chats, student, teacher, tmp_path / "full")
  capped = loader(chats, student, teacher, tmp_path / "capped", max_align=24)
  assert capped.stats["align_pairs_dropped"] == 0  # nothing handed out yet
  kept_full = kept_capped = 0
  for _ in range(3):
    a, b = next(full), next(capped)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])  # the cap does not change the packing
    kept_full, kept_capped = kept_full + int(a["align_mask"].sum()), kept_capped + int(b["align_mask"].sum())
    assert "align_pairs_dropped" not in b
  assert full.stats["align_pairs_dropped"] == 0
  assert capped.stats["align_pairs_dropped"] == kept_full - kept_capped > 0
  state = capped.get_state()
  resumed = loader(chats, student, teacher, tmp_path / "resumed", max_align=24)
  resumed.set_state(state)
  a, b = next(full), next(resumed)
  assert resumed.stats["align_pairs_dropped"] == int(a["align_mask"].sum() - b["align_mask"].sum())
