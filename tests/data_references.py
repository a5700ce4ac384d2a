"""References the data tests compare the loader with, computed without the pipeline."""

from jaxkd.data import loader as loader_lib

# The bundled ChatML template with the assistant turns marked as generations, so that transformers'
# `apply_chat_template(..., return_assistant_tokens_mask=True)` gives the reference trained-token mask.
GENERATION_CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}")


def _first_rows(batches):
  """(batch, its rows holding data) of the batches a loader yielded, up to EFFICIENCY_ROWS such rows (whole
  batches, as the loader counts them when it measures its first rows)."""
  total = 0
  for batch in batches:
    if total >= loader_lib.EFFICIENCY_ROWS:
      return
    real = batch["segment_ids"].any(axis=1)
    total += int(real.sum())
    yield batch, real


def packing_efficiency(batches) -> float:
  """The non-padding share of the first rows, to check the figure a loader reports at start."""
  used = total = 0
  for batch, real in _first_rows(batches):
    used += int((batch["segment_ids"][real] > 0).sum())
    total += int(real.sum()) * batch["segment_ids"].shape[1]
  return used / total


def align_coverage(batches) -> float:
  """The share of the first rows' student tokens that have an aligned teacher token (another tokenizer)."""
  used = aligned = 0
  for batch, real in _first_rows(batches):
    used += int((batch["segment_ids"][real] > 0).sum())
    aligned += int(batch["align_mask"][real].sum())
  return aligned / used
