"""Training: the pretraining loop and what it is built from (optimizer and schedule, MoE balancing,
checkpoints, metrics sinks, MFU, plots, expert-specialisation analysis)."""

from nanoseek.train.config import TrainConfigError, load_config
from nanoseek.train.pretrain import DataConfig, TrainConfig, load_train_config, pretrain

__all__ = ["DataConfig", "TrainConfig", "TrainConfigError", "load_config", "load_train_config", "pretrain"]
