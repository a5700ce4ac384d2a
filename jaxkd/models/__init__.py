"""Flax NNX ports of Qwen2, Qwen3, Llama and StableLM on one shared decoder, loaded from and exported to HF."""

from jaxkd.models.config import ModelConfig, RopeConfig, UnsupportedConfigError
from jaxkd.models.hf_io import (FAMILIES, config_from_hf, config_to_hf, from_pretrained, read_config,
                                save_pretrained)
from jaxkd.models.safetensors_io import WeightsError
from jaxkd.models.transformer import ModelOutput, Transformer
