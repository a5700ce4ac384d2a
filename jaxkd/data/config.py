"""The data section of a run config: every key, its default, and what it does."""

from __future__ import annotations

import ml_collections

from jaxkd.data.assets import CHAT_SHAREGPT
from jaxkd.data.formats import DataError
from jaxkd.data.sources import parse_sources

OVERLONG = ("truncate", "drop")
TRAIN_ON = ("assistant", "all")


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults that train on the bundled ShareGPT chats; a run config overrides what it needs."""
  c = ml_collections.ConfigDict()
  # Sources, mixed by weight. Each is a dict with:
  #   path        a local file, glob, list of files, {split: files} dict or folder (json, jsonl, parquet,
  #               arrow, csv, txt; or a `save_to_disk` folder), or a Hugging Face hub dataset name; or
  #   tfds        a TFDS dataset name (with data_dir) or a prepared TFDS folder, read with tfds.data_source
  #               (array_record files; no TensorFlow needed)
  #   name        HF dataset config name            data_dir    TFDS data dir
  #   split       the split to train on ("train")   eval_split  this source's held-out split (data.eval_split)
  #   format      overrides data.format             weight      relative mixing weight (1.0)
  #   streaming   read with HF streaming, tokenizing on the fly (for sets too large to tokenize up front)
  #   columns     {canonical: actual} renames, e.g. {"conversations": "dialog"}
  c.sources = [dict(path=CHAT_SHAREGPT)]
  # "auto" (from the column names) or one of sharegpt, messages (OpenAI, with tool_calls, tool messages and
  # a tools column), alpaca, prompt_completion, text, xlam (query/tools/answers), glaive (system/chat).
  c.format = "auto"
  # Chat template: None = the student tokenizer's own; "chatml"; "chatml_tools" (ChatML that renders tools
  # and tool calls as Qwen2.5 does); "chatml_bundled_tools" (ChatML with tools and calls in the bundled chats'
  # text form, which the tiny models learnt); or a Jinja template string. Tool-calling data needs a template
  # that renders `tools` and `tool_calls` (the model's own): rows whose calls a template drops are skipped.
  c.chat_template = None
  # The teacher's template when its tokenizer differs: None = the teacher tokenizer's own, else the student's.
  c.teacher_chat_template = None
  # "assistant": the loss covers assistant turns (and the end-of-turn token after each); "all": every token.
  # Plain text is always trained on all tokens.
  c.train_on = "assistant"
  # Special tokens that end an assistant turn and are trained with it. None: eos and special tokens whose text
  # says "end" (<|im_end|>, <|eot_id|>, ...) when found right after the turn. Templates with
  # {% generation %} markers decide this themselves.
  c.end_of_turn = None
  # Extra role spellings, e.g. {"bot": "assistant"}, on top of human/gpt/user/assistant/system/tool/...
  c.role_aliases = {}
  # Rows with string prompt/completion: True = a user turn and an assistant turn under the chat template;
  # False = raw text prompt + completion with the loss on the completion (base models).
  c.chat_prompt_completion = True
  # Plain text: wrap in the tokenizer's own specials (e.g. bos) and end with eos, trained, so the model
  # learns where a document ends.
  c.add_eos = True
  # Examples longer than seq_len (or teacher_seq_len): "truncate" or "drop"; both are counted.
  c.overlong = "truncate"
  # Teacher-side row length when the teacher tokenizer differs (None: seq_len).
  c.teacher_seq_len = None
  # Alignment pairs kept per row (None: seq_len, which always holds all of them).
  c.max_align = None
  # Held-out eval rows: a fraction of each source's rows, chosen by a hash of (eval_seed, row number; a
  # streaming row's content), the same whatever the number of processes ...
  c.eval_fraction = 0.0
  # ... or a named split of every source (e.g. "test"); a source's own eval_split wins.
  c.eval_split = None
  # Which rows the eval fraction holds out; separate from the training seed so eval stays put across runs.
  c.eval_seed = 0
  # Eval: exactly this many batches per process, padding with empty batches after the data ends. Set it with
  # several processes so every process runs the same number of eval steps. None: until the data ends.
  c.eval_batches = None
  # True: the first bad row (missing field, unknown role, ...) is an error naming it; False: skip and count.
  c.strict = False
  # Reshuffle the examples every epoch, deterministically from the seed.
  c.shuffle = True
  # Passes over the training data: None = forever.
  c.epochs = None
  # Rows filled at once by first-fit packing (None: this process's batch rows); more bins pack tighter.
  c.packing_bins = None
  # Worker processes for the up-front tokenization (0: tokenize in this process).
  c.num_workers = 0
  # Rows rendered and tokenized per batched tokenizer call.
  c.encode_chunk = 1024
  # Batches prepared ahead in a background thread (0: none).
  c.prefetch = 2
  # Streaming sources: size of the shuffle window.
  c.shuffle_buffer = 10_000
  # Tokenization cache folder. None: make_loader's cache_dir, else $JAXKD_DATA_CACHE or ~/.cache/jaxkd/data.
  # "" turns the cache off.
  c.cache_dir = None
  return c


def check(cfg) -> None:
  """The data section's checks that need no file read: DataError naming the key. The trainer runs them at
  start, before any model is read; the loader runs them too, for callers that build it alone."""
  if cfg.overlong not in OVERLONG:
    raise DataError(f"data.overlong={cfg.overlong!r}: use 'truncate' or 'drop'")
  if cfg.train_on not in TRAIN_ON:
    raise DataError(f"data.train_on={cfg.train_on!r}: use 'assistant' (loss on assistant turns) or 'all'")
  if cfg.eval_fraction and not 0 < cfg.eval_fraction < 1:
    raise DataError(f"data.eval_fraction={cfg.eval_fraction}: use a fraction in (0, 1)")
  if cfg.epochs is not None and cfg.epochs < 1:
    raise DataError(f"data.epochs={cfg.epochs}: use None (no end) or a number of passes >= 1")
  specs = parse_sources(list(cfg.sources), default_format=cfg.format, default_eval_split=cfg.eval_split)
  if any(s.streaming for s in specs) and len(specs) > 1 and cfg.epochs is not None:
    raise DataError("data.epochs with a mixture that includes streaming sources is undefined (their size is "
                    "unknown): set data.epochs=None and stop the run by steps")
