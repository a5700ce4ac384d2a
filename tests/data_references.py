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


def packing_efficiency(batches) -> float:
  """The non-padding share of the first EFFICIENCY_ROWS rows holding data, counted in the batches a loader
  yielded (whole batches, as the loader counts them), to check the figure it reports at start."""
  used = total = 0
  for batch in batches:
    if total >= loader_lib.EFFICIENCY_ROWS * batch["segment_ids"].shape[1]:
      break
    real = batch["segment_ids"].any(axis=1)
    used += int((batch["segment_ids"][real] > 0).sum())
    total += int(real.sum()) * batch["segment_ids"].shape[1]
  return used / total
