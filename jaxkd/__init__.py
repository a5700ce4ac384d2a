"""jaxkd: knowledge distillation of large language models in JAX/Flax."""
