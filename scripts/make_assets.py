"""Writes the bundled tokenizer and chat dataset into jaxkd/assets/, deterministically from a seed.

    python scripts/make_assets.py            # rewrites jaxkd/assets/{tokenizer,data}
    python scripts/make_assets.py --check    # regenerates into a temp dir and fails if anything differs

The conversations come from jaxkd.data.synthetic (answers drawn from distributions over valid phrasings, so
a teacher's probabilities carry more than a sampled label; a few system and tool turns). They are written
twice: ShareGPT (`conversations` of `from`/`value`) and OpenAI-style (`messages` of `role`/`content`); those
that call tools a third time in the OpenAI tool-calling layout (`tool_calls`, `tool` messages, `tools`). The
tokenizer is a byte-level BPE trained on the dataset text with ChatML special tokens and chat template; a
SentencePiece-style BPE on the same text is the tokenizer of the tiny cross-tokenizer teacher.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import sys
import tempfile

from jaxkd.data.assets import ASSETS_DIR
from jaxkd.data.synthetic import (DEFAULT_SEED, NUM_CONVERSATIONS, make_conversations, tokenizer_corpus,
                                  train_metaspace_tokenizer, train_tokenizer, write_datasets)


def write_all(seed: int, n: int, assets_dir: str) -> None:
  conversations = make_conversations(seed, n)
  write_datasets(conversations, os.path.join(assets_dir, "data"))
  tok = train_tokenizer(tokenizer_corpus(conversations))
  tok.save_pretrained(os.path.join(assets_dir, "tokenizer"))
  other = train_metaspace_tokenizer(tokenizer_corpus(conversations))
  other.save_pretrained(os.path.join(assets_dir, "tokenizer_other"))
  with open(os.path.join(assets_dir, "README.md"), "w") as f:
    f.write(
        "# Bundled assets (generated: do not edit by hand)\n\n"
        f"Made by `python scripts/make_assets.py` (seed {seed}, {n} conversations, BPE vocab {len(tok)}).\n\n"
        "- `data/chat_sharegpt.jsonl`: synthetic chats, ShareGPT form (`conversations` of `from`/`value`).\n"
        "- `data/chat_messages.jsonl`: the same chats, OpenAI form (`messages` of `role`/`content`).\n"
        "- `data/chat_tools_openai.jsonl`: the chats among them that call tools, in the OpenAI tool-calling\n"
        "  layout: `tool_calls` (content null, arguments a JSON string), `tool` messages with `tool_call_id`,\n"
        "  and `tools`, the JSON schemas of calculator(expression) and get_weather(city).\n"
        "- `tokenizer/`: byte-level BPE trained on those chats, ChatML special tokens and chat template.\n"
        f"- `tokenizer_other/`: a SentencePiece-style BPE (vocab {len(other)}, words with a ▁ prefix) on the\n"
        "  same text, whose tokens end at other characters: the tokenizer of the tiny cross-tokenizer\n"
        "  teacher (`tiny:llama-teacher-othertok`).\n"
        "- `teacher/`: the trained tiny teacher, made by `python scripts/train_teacher.py`.\n\n"
        "Answers are sampled from distributions over valid phrasings, synonyms, list orders and story\n"
        "grammar choices, so a teacher's probabilities carry information a single sampled label does not.\n")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
  parser.add_argument("--num_conversations", type=int, default=NUM_CONVERSATIONS)
  parser.add_argument("--out", default=ASSETS_DIR, help="assets folder to write")
  parser.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare with --out")
  args = parser.parse_args(argv)
  if not args.check:
    write_all(args.seed, args.num_conversations, args.out)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")
    return 0
  with tempfile.TemporaryDirectory() as tmp:
    write_all(args.seed, args.num_conversations, tmp)
    # Compare what this script makes; other files in the folder (a model someone saved there) are not its.
    made = sorted(os.path.relpath(os.path.join(d, f), tmp) for d, _, fs in os.walk(tmp) for f in fs)
    differ = [m for m in made if not os.path.exists(os.path.join(args.out, m))
              or not filecmp.cmp(os.path.join(tmp, m), os.path.join(args.out, m), shallow=False)]
    if differ:
      print("assets differ from a fresh generation: " + ", ".join(differ))
      return 1
  print("assets match a fresh generation")
  return 0


if __name__ == "__main__":
  sys.exit(main())
