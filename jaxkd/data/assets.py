"""Paths of the files bundled in jaxkd/assets (made by scripts/make_assets.py) for tiny configs and tests."""

from __future__ import annotations

import os

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
TOKENIZER_DIR = os.path.join(ASSETS_DIR, "tokenizer")
CHAT_SHAREGPT = os.path.join(ASSETS_DIR, "data", "chat_sharegpt.jsonl")
CHAT_MESSAGES = os.path.join(ASSETS_DIR, "data", "chat_messages.jsonl")
