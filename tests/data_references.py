"""References the data tests compare the loader with, computed without the pipeline."""

# The bundled ChatML template with the assistant turns marked as generations, so that transformers'
# `apply_chat_template(..., return_assistant_tokens_mask=True)` gives the reference trained-token mask.
GENERATION_CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}")

