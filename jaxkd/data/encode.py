"""Examples to tokens: chat-template rendering, trained-token masks, and the two-tokenizer alignment.

A `Side` is one tokenizer with its chat template. It renders an example to text and records character
spans: the spans the loss covers (each assistant message plus the end-of-turn token right after it, or
the whole text) and the span of every message's content. A fast tokenizer's character offsets turn those
spans into a per-token mask, so the mask follows whatever the template renders around the messages.

An assistant turn that calls tools is rendered by the template from its `tool_calls`, not from its content,
so its span is found by rendering the conversation up to it with the generation prompt and then through it:
the difference, up to its end-of-turn token, is what the model writes (what transformers'
`return_assistant_tokens_mask` gives on a `{% generation %}`-marked copy of the template). Tool results are
never trained.

With a teacher tokenizer that differs from the student's, each example is rendered and tokenized by both,
and tokens are paired where a student token and a teacher token end at the same character of the same
message content (of the whole text when both sides render the same text). Hidden-state distillation across
tokenizers compares the two models at those pairs.

`Encoder.encode` does this for a batch of rows at once (the Rust tokenizer encodes the batch in parallel)
and returns flat arrays, with bad rows skipped and counted.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping, Sequence

import numpy as np

from jaxkd.data.formats import BAD_REASONS, ROLE_ALIASES, BadRow, Conversation, DataError, Text, to_example

# A ChatML template (Qwen's turn format without its default system prompt) for tokenizers that ship none.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# ChatML with tools, as Qwen2.5-Instruct renders them (the schemas in the system turn, each call a
# <tool_call>{"name", "arguments"}</tool_call> block, tool results as <tool_response> blocks of a user turn),
# again without Qwen's default system prompt: the tiny models' template for tool-calling data such as
# jaxkd/assets/data/chat_tools_openai.jsonl. Conversations without tools or tool turns render as CHATML_TEMPLATE does.
CHATML_TOOLS_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided "
    "with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first and tools %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' + tool_call.arguments | tojson "
    "+ '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# ChatML with tools in the bundled chats' own text form (jaxkd.data.synthetic's tool conversations, which the
# bundled tiny teacher was trained on): the tool list as one sentence closing the system turn
# ("... Tools: calculator(expression), get_weather(city)."), each call a <tool_call>{"name": ..., argument:
# value, ...}</tool_call> with the arguments inline, tool results as plain `tool` turns. On
# jaxkd/assets/data/chat_tools_openai.jsonl it renders the text of the same chats in chat_messages.jsonl under
# CHATML_TEMPLATE, character for character: the OpenAI layout of those chats, as the tiny models read them.
CHATML_BUNDLED_TOOLS_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + ' ' }}{%- endif %}"
    "{{- 'To call one, answer with <tool_call>{json}</tool_call>. Tools: ' }}"
    "{%- for tool in tools %}"
    "{%- if tool.function is defined %}{%- set tool = tool.function %}{%- endif %}"
    "{{- tool.name + '(' + (tool.parameters.properties if tool.parameters is defined and tool.parameters.properties "
    "is defined else {}) | list | join(', ') + ')' + (', ' if not loop.last else '.') }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first and tools %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message.content %}{{- message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>{\"name\": ' + tool_call.name | tojson }}"
    "{%- for key, value in tool_call.arguments.items() %}"
    "{{- ', ' + key | tojson + ': ' + value | tojson }}"
    "{%- endfor %}"
    "{{- '}</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE, "chatml_tools": CHATML_TOOLS_TEMPLATE,
                   "chatml_bundled_tools": CHATML_BUNDLED_TOOLS_TEMPLATE}

FIRST_BAD_ROWS = 5  # row indices kept per bad-row reason for the summary
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Private-use characters no template touches: a render with these in place of each message's content shows
# where the template puts every message.
_SENTINEL = re.compile("\ue000(\\d+)\ue001")


@dataclasses.dataclass
class Rendered:
  text: str
  trained: list[tuple[int, int]]  # character spans the loss covers, sorted
  # Message contents without their surrounding whitespace (the whole text for plain text), which both sides'
  # templates keep alike (one may trim a message, the other not): token ends are compared relative to these.
  anchors: list[tuple[int, int]]
  plain: bool  # plain text: wrapped in the tokenizer's own special tokens and followed by eos


def resolve_template(template: str | None, tok) -> str | None:
  """A config template value ("chatml", a Jinja string, or None for the tokenizer's own) to Jinja text."""
  if template is None:
    return getattr(tok, "chat_template", None) or None
  return NAMED_TEMPLATES.get(template, template)


def teacher_template(cfg, teacher_tok, student_template: str | None) -> str | None:
  """The chat template of a teacher whose tokenizer differs: data.teacher_chat_template, else the teacher
  tokenizer's own, else the student's."""
  if cfg.teacher_chat_template is not None:
    return resolve_template(cfg.teacher_chat_template, teacher_tok)
  return resolve_template(None, teacher_tok) or student_template


def _auto_end_of_turn(tok) -> list[str]:
  """Special tokens that close a turn: eos and added special tokens whose text says "end" (<|im_end|>,
  <|eot_id|>, <end_of_turn>, <|end|>, </s>). Only one found right after an assistant message is trained."""
  found = {tok.eos_token} if tok.eos_token else set()
  for added in getattr(tok, "added_tokens_decoder", {}).values():
    text = added.content
    if added.special and ("end" in text.lower() or "eot" in text.lower() or text == "</s>"):
      found.add(text)
  return sorted(found, key=len, reverse=True)


def _check_template(template: str, name: str) -> None:
  """A template that does not compile is a config error, not a bad row in every row."""
  import jinja2
  from transformers.utils import chat_template_utils as ctu

  compile_template = getattr(ctu, "_compile_jinja_template", None)
  if compile_template is None:
    return  # rendering will report it
  try:
    compile_template(template)
  except jinja2.TemplateSyntaxError as e:
    raise DataError(f"the {name} chat template does not compile (line {e.lineno}: {e.message}); fix "
                    f"data.{'chat_template' if name == 'student' else 'teacher_chat_template'} or the "
                    "tokenizer's chat_template") from e


class Side:
  """One tokenizer and its chat template: renders examples and tokenizes them with character offsets."""

  def __init__(self, tok, template: str | None, *, end_of_turn: Sequence[str] | None = None,
               add_eos: bool = True, name: str = "student"):
    from tokenizers import Tokenizer

    self.tok = tok
    self.name = name
    self.template = template
    self.has_generation = bool(template and _GENERATION.search(template))
    if template is not None:
      _check_template(template, name)
    # A private copy without post-processing: the post-processor would add special tokens we place
    # ourselves and can trim whitespace out of offsets (GPT-2's trim_offsets), which would drop
    # whitespace-only tokens from the masks.
    self.backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    self.backend.post_processor = None
    self.backend.no_truncation()
    self.backend.no_padding()
    self.end_of_turn = sorted(end_of_turn, key=len, reverse=True) if end_of_turn else _auto_end_of_turn(tok)
    self.template_vars = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    self._pieces: dict = {}  # (roles, tools) -> the template's text around each message, see _content_spans
    # The special ids the tokenizer itself puts around plain text (Llama's <s>, none for Qwen).
    bare = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a", add_special_tokens=True)["input_ids"]
    k = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), 0)
    self.prefix_ids = [int(i) for i in full[:k]]
    self.suffix_ids = [int(i) for i in full[k + len(bare):]]
    eos = tok.eos_token_id
    if add_eos and eos is not None and eos not in self.suffix_ids:
      self.suffix_ids.append(int(eos))

  def __getstate__(self):
    # Worker processes need the backend and the template, not the transformers tokenizer: leaving it out
    # spares each worker the import of transformers' model code (and torch) when unpickling.
    return {k: v for k, v in self.__dict__.items() if k != "tok"}

  # -- rendering ------------------------------------------------------------------------------------------

  def _render(self, messages, tools, generation: bool = False, prompt: bool = False):
    """(text, generation spans or None), with `tools` passed to the template as transformers passes them.
    Without generation spans the compiled template is called directly: transformers' per-call conversion of
    its inputs (dataclasses, reasoning aliases) costs as much as the rendering and changes nothing for the
    plain JSON that formats.py makes."""
    from transformers.utils import chat_template_utils as ctu

    if not generation and hasattr(ctu, "_compile_jinja_template"):
      return ctu._compile_jinja_template(self.template).render(  # pylint: disable=protected-access
          messages=messages, tools=tools, documents=None, add_generation_prompt=prompt, **self.template_vars), None
    texts, indices = ctu.render_jinja_template([messages], tools=tools, chat_template=self.template,
                                               return_assistant_tokens_mask=generation,
                                               add_generation_prompt=prompt, **self.template_vars)
    return texts[0], (indices[0] if generation else None)

  def render_text(self, messages, tools=None, *, generation_prompt: bool = False) -> str:
    """The template's text of `messages` (and `tools`), rendered as training renders it; with the generation
    prompt, the text a model reads before it writes the next assistant turn (jaxkd.function_calling)."""
    return self._render(messages, tools, prompt=generation_prompt)[0]

  def _content_spans(self, conv: Conversation, text: str, tools) -> list[tuple[int, int] | None]:
    """Where each message's content sits in `text`: from a render with sentinels in place of the contents
    when that reproduces `text` exactly, else by searching each content in order. None for a message the
    template does not show as given (no content, a call turn's text that Llama 3.1 drops, a tool result it
    passes through `tojson`): such messages are not trained by their content, so only a plain assistant
    reply that cannot be found makes the row bad."""
    messages = conv.messages
    # A call turn with empty content keeps it: templates test `if message.content` to place the calls.
    marked_at = [i for i, m in enumerate(messages) if "content" in m and (m["content"] or "tool_calls" not in m)]
    # With placeholders the render of plain messages depends only on the roles (and tools), so it is shared
    # by every conversation with the same turn pattern; the comparison with `text` below keeps each row
    # exact. Calls, ids and names make each render its own: those are not kept.
    shared = all(m.keys() <= {"role", "content"} for m in messages)
    key = (tuple(m["role"] for m in messages), None if tools is None else json.dumps(tools, sort_keys=True))
    pieces = self._pieces.get(key) if shared else None
    if pieces is None:
      marked = [dict(m) for m in messages]
      for k, i in enumerate(marked_at):
        marked[i]["content"] = f"\ue000{k}\ue001"
      try:
        pieces = _SENTINEL.split(self._render(marked, tools)[0])
      except Exception:  # a template may reject placeholder content; the search below still works
        pieces = []
      if shared and len(self._pieces) < 4096:
        self._pieces[key] = pieces
    n = len(marked_at)
    valid = len(pieces) == 2 * n + 1 and [int(p) for p in pieces[1::2]] == list(range(n))
    spans: list[tuple[int, int] | None] = [None] * len(messages)
    if valid:
      out, pos = [], 0
      for k, i in enumerate(marked_at):
        out.append(pieces[2 * k])
        pos += len(pieces[2 * k])
        content = messages[i]["content"]
        spans[i] = (pos, pos + len(content))
        out.append(content)
        pos += len(content)
      out.append(pieces[-1])
      if "".join(out) == text:
        return spans
    # The template changes content (trims it, ...): each message's content must follow its own markup.
    # Searching the content alone could match inside the markup before it (a reply "a" or "assistant"
    # inside "<|im_start|>assistant"), which would train the markup and not the reply.
    spans, cursor = [None] * len(messages), 0
    for k, i in enumerate(marked_at):
      message = messages[i]
      content = message["content"]
      candidates = dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip()))
      if valid:  # the markup is known: the content starts right after it
        at = text.find(pieces[2 * k], cursor)
        start = at + len(pieces[2 * k])
        found = next((c for c in candidates if at >= 0 and text.startswith(c, start)), None)
      else:  # the template rejected placeholder contents: search for the content itself
        start, found = next(((s, c) for c in candidates if (s := text.find(c, cursor)) >= 0), (-1, None))
      if found is None:
        if message["role"] == "assistant" and "tool_calls" not in message:
          raise BadRow("content_not_in_template",
                       f"{self.name} template changes the text of message {i} ({message['role']})")
        continue
      spans[i] = (start, start + len(found))
      cursor = start + len(found)
    return spans

  def _call_turn(self, ex: Conversation, i: int, text: str) -> tuple[int, int]:
    """The characters the model writes for assistant message `i`, which calls tools: the render of
    messages[:i+1] past the render of messages[:i] with the generation prompt, up to its end-of-turn token.
    That is what a {% generation %}-marked copy of the template marks, wherever the template puts the calls
    (Qwen2.5's <tool_call> blocks after the content, Llama 3.1's JSON in place of it)."""
    try:
      before = self._render(ex.messages[:i], ex.tools, prompt=True)[0]
      through = self._render(ex.messages[:i + 1], ex.tools)[0]
    except Exception as e:
      raise BadRow("template_error", f"{self.name} template: {type(e).__name__}: {e}") from None
    if not (through.startswith(before) and text.startswith(through)):
      raise BadRow("content_not_in_template",
                   f"{self.name} template renders the turns before message {i} differently once message {i} "
                   "follows them, so its tool call cannot be located")
    turn = through[len(before):]
    _require_calls(turn, ex.messages[i], i, self.name)
    ends = [at + len(t) for t in self.end_of_turn if (at := turn.find(t)) >= 0]
    return len(before), len(before) + (min(ends) if ends else len(turn.rstrip()))

  def render(self, ex: Conversation | Text, train_on: str) -> Rendered:
    if isinstance(ex, Text):
      return Rendered(ex.text, [(ex.train_from, len(ex.text))], [(0, len(ex.text))], plain=True)
    if self.template is None:
      raise DataError(f"the {self.name} tokenizer has no chat template and the data has conversations: set "
                      f"data.{'chat_template' if self.name == 'student' else 'teacher_chat_template'}='chatml' "
                      "(or a Jinja template string)")
    try:
      text, generation = self._render(ex.messages, ex.tools, generation=self.has_generation)
    except Exception as e:
      raise BadRow("template_error", f"{self.name} template: {type(e).__name__}: {e}") from None
    # Calls and schemas a template leaves out would train a conversation without them: refuse the row.
    unseen = [name for name in map(_tool_name, ex.tools or ()) if name and name not in text]
    if unseen:
      raise BadRow("template_error", f"{self.name} template does not render the tools {unseen}: use a chat "
                   "template that renders `tools` (the model's own)")
    spans = self._content_spans(ex, text, ex.tools)
    if train_on == "all":
      trained = [(0, len(text))]
    elif generation is not None:  # the template marks what the model generates: trust it
      for i, message in enumerate(ex.messages):
        if "tool_calls" in message:
          _require_calls(text, message, i, self.name)
      trained = sorted((int(s), int(e)) for s, e in generation)
    else:
      trained = []
      for i, (span, message) in enumerate(zip(spans, ex.messages)):
        if message["role"] != "assistant":
          continue
        if "tool_calls" in message:
          trained.append(self._call_turn(ex, i, text))
          continue
        start, end = span
        gap = len(text[end:]) - len(text[end:].lstrip(" "))  # Llama 2 puts a space before </s>
        eot = next((t for t in self.end_of_turn if text.startswith(t, end + gap)), None)
        trained.append((start, end + gap + len(eot) if eot else end))
    # A message the template does not show as given anchors nothing: an empty anchor keeps them in order.
    anchors, at = [], 0
    for span in spans:
      anchors.append(_stripped(text, span) if span is not None else (at, at))
      at = anchors[-1][1]
    return Rendered(text, trained, anchors, plain=False)

  # -- tokenizing -----------------------------------------------------------------------------------------

  def tokenize(self, rendered: Sequence[Rendered]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids, offsets [L, 2], trained mask) per rendered example, in one batched call to the tokenizer."""
    encodings = self.backend.encode_batch([r.text for r in rendered], add_special_tokens=False)
    out = []
    for r, enc in zip(rendered, encodings):
      ids = np.asarray(enc.ids, np.int32)
      offsets = np.asarray(enc.offsets, np.int32).reshape(-1, 2)
      mask = _overlaps(offsets, r.trained)
      if r.plain and (self.prefix_ids or self.suffix_ids):
        n = len(r.text)
        pre, suf = len(self.prefix_ids), len(self.suffix_ids)
        ids = np.concatenate([np.asarray(self.prefix_ids, np.int32), ids, np.asarray(self.suffix_ids, np.int32)])
        offsets = np.concatenate([np.zeros((pre, 2), np.int32), offsets, np.full((suf, 2), n, np.int32)])
        # The closing specials (eos) are trained when the text's end is: the model learns where text ends.
        ends_trained = bool(r.trained) and r.trained[-1][1] >= n
        mask = np.concatenate([np.zeros(pre, bool), mask, np.full(suf, ends_trained)])
      out.append((ids, offsets, mask))
    return out


def _tool_name(tool) -> str | None:
  function = tool.get("function", tool) if isinstance(tool, Mapping) else None
  return function.get("name") if isinstance(function, Mapping) else None


def _require_calls(text: str, message: Mapping, i: int, name: str) -> None:
  """BadRow when `text` lacks the name of a function that message `i` calls: the template dropped the call."""
  missing = [c["function"]["name"] for c in message["tool_calls"] if c["function"]["name"] not in text]
  if missing:
    raise BadRow("template_error", f"{name} template does not render the tool calls of message {i} "
                 f"({', '.join(missing)}): use a chat template that renders `tool_calls` (the model's own)")


def _stripped(text: str, span: tuple[int, int]) -> tuple[int, int]:
  start, end = span
  lead = len(text[start:end]) - len(text[start:end].lstrip())
  return start + lead, start + lead + len(text[start:end].strip())


def _overlaps(offsets_Lx2: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
  """For each token, whether its character span overlaps any of the sorted, disjoint `spans`."""
  if not spans or not len(offsets_Lx2):
    return np.zeros(len(offsets_Lx2), bool)
  starts = np.asarray([s for s, _ in spans])
  ends = np.asarray([e for _, e in spans])
  a, b = offsets_Lx2[:, 0], offsets_Lx2[:, 1]
  k = np.searchsorted(ends, a, side="right")  # the first span ending after the token starts
  inside = k < len(spans)
  return inside & (starts[np.minimum(k, len(spans) - 1)] < b) & (b > a)


def _end_keys(offsets_Lx2: np.ndarray, anchors: list[tuple[int, int]], stride: int):
  """Token indices and keys (anchor, character offset of the token's end in it): the last token per key."""
  a, b = offsets_Lx2[:, 0], offsets_Lx2[:, 1]
  starts = np.asarray([s for s, _ in anchors], np.int64)
  ends = np.asarray([e for _, e in anchors], np.int64)
  k = np.searchsorted(starts, b - 1, side="right") - 1  # the anchor holding the token's last character
  kc = np.maximum(k, 0)
  ok = (b > a) & (k >= 0) & (b <= ends[kc]) & (b > starts[kc])
  idx = np.flatnonzero(ok)
  keys = kc[idx] * stride + (b[idx] - starts[kc[idx]])
  # Byte-level tokens that split one character share its end: keep the last, the one that completes it.
  _, last = np.unique(keys[::-1], return_index=True)
  keep = np.sort(len(idx) - 1 - last)
  return idx[keep], keys[keep]


def align(student: Rendered, s_offsets: np.ndarray, teacher: Rendered, t_offsets: np.ndarray) -> np.ndarray:
  """[P, 2] (student index, teacher index) of tokens ending at the same character of the same anchor."""
  if student.text == teacher.text:
    anchors_s = anchors_t = [(0, len(student.text))]
  else:
    anchors_s, anchors_t = student.anchors, teacher.anchors
  stride = max(len(student.text), len(teacher.text)) + 1
  s_idx, s_keys = _end_keys(s_offsets, anchors_s, stride)
  t_idx, t_keys = _end_keys(t_offsets, anchors_t, stride)
  _, i_s, i_t = np.intersect1d(s_keys, t_keys, assume_unique=True, return_indices=True)
  pairs = np.stack([s_idx[i_s], t_idx[i_t]], axis=1).astype(np.int32)
  return pairs[np.argsort(pairs[:, 0], kind="stable")]


# ---------------------------------------------------------------------------------------------------------
# Batches of rows to flat arrays
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Encoded:
  """Flat token arrays for a run of rows; row i's tokens are ids[offsets[i]:offsets[i + 1]] (empty if bad)."""

  ids: np.ndarray  # int32 [N_tokens]
  mask: np.ndarray  # uint8 [N_tokens]: 1 where the token is trained (it is a target of the token before)
  offsets: np.ndarray  # int64 [rows + 1]
  status: np.ndarray  # int8 [rows]: 0 kept, else 1 + index into BAD_REASONS
  teacher_ids: np.ndarray | None = None  # int32 [N_teacher_tokens]
  teacher_offsets: np.ndarray | None = None  # int64 [rows + 1]
  align: np.ndarray | None = None  # int32 [N_pairs, 2], indices local to each example
  align_offsets: np.ndarray | None = None  # int64 [rows + 1]
  # reason -> {"count": n, "first": [[row, detail], ...]} with the first FIRST_BAD_ROWS rows
  problems: dict = dataclasses.field(default_factory=dict)

  ARRAYS = ("ids", "mask", "offsets", "status", "teacher_ids", "teacher_offsets", "align", "align_offsets")

  @property
  def rows(self) -> int:
    return len(self.status)

  @staticmethod
  def concat(parts: Sequence["Encoded"]) -> "Encoded":
    def flat(name):
      return None if getattr(parts[0], name) is None else np.concatenate([getattr(p, name) for p in parts])

    def offs(name, values):
      if getattr(parts[0], name) is None:
        return None
      out, base = [np.zeros(1, np.int64)], 0
      for p in parts:
        out.append(getattr(p, name)[1:] + base)
        base += len(getattr(p, values))
      return np.concatenate(out)

    problems: dict = {}
    for p in parts:
      merge_problems(problems, p.problems)
    return Encoded(ids=flat("ids"), mask=flat("mask"), offsets=offs("offsets", "ids"), status=flat("status"),
                   teacher_ids=flat("teacher_ids"), teacher_offsets=offs("teacher_offsets", "teacher_ids"),
                   align=flat("align"), align_offsets=offs("align_offsets", "align"), problems=problems)


def merge_problems(into: dict, other: Mapping) -> dict:
  for reason, entry in other.items():
    mine = into.setdefault(reason, {"count": 0, "first": []})
    mine["count"] += entry["count"]
    mine["first"] = (mine["first"] + [list(x) for x in entry["first"]])[:FIRST_BAD_ROWS]
  return into


class Encoder:
  """Rows of one format to `Encoded` with the student side and, optionally, the teacher side."""

  def __init__(self, student: Side, teacher: Side | None = None, *, train_on: str = "assistant",
               chat_prompt_completion: bool = True, role_aliases: Mapping[str, str] | None = None,
               strict: bool = False):
    self.student, self.teacher = student, teacher
    self.train_on = train_on
    self.chat_prompt_completion = chat_prompt_completion
    self.role_aliases = {**ROLE_ALIASES, **(role_aliases or {})}
    self.strict = strict

  def encode(self, rows: Sequence[Mapping[str, Any]], fmt: str, row_ids: Sequence[int],
             label: str = "") -> Encoded:
    """Encodes `rows` (whose dataset row numbers are `row_ids`); bad rows get a status and no tokens."""
    status = np.zeros(len(rows), np.int8)
    problems: dict = {}
    good: list[int] = []
    rendered_s, rendered_t = [], []

    def bad(i: int, e: BadRow):
      if self.strict:
        raise DataError(f"{label} row {row_ids[i]}: {e.reason}: {e.detail} (data.strict=True; set it False to "
                        "skip and count such rows)") from None
      status[i] = 1 + BAD_REASONS.index(e.reason)
      entry = problems.setdefault(e.reason, {"count": 0, "first": []})
      entry["count"] += 1
      if len(entry["first"]) < FIRST_BAD_ROWS:
        entry["first"].append([int(row_ids[i]), e.detail])

    for i, row in enumerate(rows):
      try:
        ex = to_example(row, fmt, chat_prompt_completion=self.chat_prompt_completion,
                        role_aliases=self.role_aliases)
        rs = self.student.render(ex, self.train_on)
        rt = self.teacher.render(ex, self.train_on) if self.teacher is not None else None
      except BadRow as e:
        bad(i, e)
        continue
      good.append(i)
      rendered_s.append(rs)
      rendered_t.append(rt)

    toks_s = self.student.tokenize(rendered_s)
    toks_t = self.teacher.tokenize(rendered_t) if self.teacher is not None else [None] * len(good)
    n = len(rows)
    lengths, t_lengths, a_lengths = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    ids, masks, t_ids, pairs = [], [], [], []
    for j, i in enumerate(good):
      s_ids, s_off, s_mask = toks_s[j]
      if not s_mask[1:].any():  # the first token is never a target, so it cannot carry the loss
        bad(i, BadRow("no_trainable_token", "no assistant token to train on" if self.train_on == "assistant"
                      else "fewer than two tokens"))
        continue
      ids.append(s_ids)
      masks.append(s_mask.astype(np.uint8))
      lengths[i] = len(s_ids)
      if self.teacher is not None:
        tt_ids, t_off, _ = toks_t[j]
        t_ids.append(tt_ids)
        t_lengths[i] = len(tt_ids)
        p = align(rendered_s[j], s_off, rendered_t[j], t_off)
        pairs.append(p)
        a_lengths[i] = len(p)

    def cat(chunks, dtype, shape=(0,)):
      return np.concatenate(chunks).astype(dtype) if chunks else np.zeros(shape, dtype)

    def offsets(lens):
      return np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)

    out = Encoded(ids=cat(ids, np.int32), mask=cat(masks, np.uint8), offsets=offsets(lengths), status=status,
                  problems=problems)
    if self.teacher is not None:
      out.teacher_ids, out.teacher_offsets = cat(t_ids, np.int32), offsets(t_lengths)
      out.align, out.align_offsets = cat(pairs, np.int32, (0, 2)).reshape(-1, 2), offsets(a_lengths)
    return out


# ---------------------------------------------------------------------------------------------------------
# Worker processes (data.num_workers): each holds one Encoder and encodes chunks of rows.
# ---------------------------------------------------------------------------------------------------------

_WORKER_ENCODER: Encoder | None = None


def worker_init(encoder: Encoder) -> None:
  import os

  os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; avoid oversubscription
  global _WORKER_ENCODER
  _WORKER_ENCODER = encoder


def worker_encode(rows, fmt: str, row_ids, label: str) -> Encoded:
  return _WORKER_ENCODER.encode(rows, fmt, row_ids, label)
