"""Single-device DeepSeek-V3/V2 model code. Never imports torch.distributed."""

from nanoseek.model.cache import LatentCache
from nanoseek.model.config import ConfigError, ModelConfig
from nanoseek.model.transformer import Transformer

__all__ = ["ConfigError", "LatentCache", "ModelConfig", "Transformer"]
