"""jaxkd: knowledge distillation of large language models in JAX/Flax."""

import logging


def _not_the_missing_torch_notice(record: logging.LogRecord) -> bool:
  # transformers warns at import that without PyTorch "Models won't be available": jaxkd uses only its
  # tokenizers and configs, so on a machine without torch the line reads as a failure that is not one.
  return not record.getMessage().startswith("PyTorch was not found")


# Here, before any jaxkd module imports transformers; that one message only, the rest of its logging stays.
logging.getLogger("transformers").addFilter(_not_the_missing_torch_notice)
