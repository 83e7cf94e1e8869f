"""nanoseek: DeepSeek-V3/V2 in plain PyTorch."""

from nanoseek.model import ConfigError, LatentCache, ModelConfig, Transformer
from nanoseek.model.checkpoint import CheckpointError, load, save_pretrained
from nanoseek.generate import generate

__all__ = ["CheckpointError", "ConfigError", "LatentCache", "ModelConfig", "Transformer", "generate", "load",
           "save_pretrained"]
