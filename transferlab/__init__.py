"""transferlab: knowledge distillation, prompt transfer and domain adaptation in JAX."""

__version__ = "0.1.0"
