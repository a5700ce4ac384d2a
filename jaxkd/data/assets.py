"""Paths of the files bundled in jaxkd/assets (made by scripts/make_assets.py) for tiny configs and tests."""

from __future__ import annotations

import os

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
TOKENIZER_DIR = os.path.join(ASSETS_DIR, "tokenizer")
# A SentencePiece-style BPE of the same text: a teacher on it needs cross-tokenizer KD.
OTHER_TOKENIZER_DIR = os.path.join(ASSETS_DIR, "tokenizer_other")
CHAT_SHAREGPT = os.path.join(ASSETS_DIR, "data", "chat_sharegpt.jsonl")
CHAT_MESSAGES = os.path.join(ASSETS_DIR, "data", "chat_messages.jsonl")
# The conversations of CHAT_MESSAGES that call tools, in the OpenAI layout (tool_calls, tool messages, tools).
CHAT_TOOLS_OPENAI = os.path.join(ASSETS_DIR, "data", "chat_tools_openai.jsonl")
