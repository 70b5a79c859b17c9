"""grpo: teach a language model to reason with GRPO on one GPU (or a CPU)."""

__version__ = "0.1.0"
