"""Fine-tune a local Hugging Face model with any registered adapter, or in full."""

from ._loop import TrainConfig, train

__all__ = ["TrainConfig", "train"]
