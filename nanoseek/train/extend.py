"""Context extension: write a RoPE scaling into a model's config, then fine-tune briefly at the longer
length on passkey documents (YaRN arXiv 2309.00071 §4: 400 steps at the new length suffice for s=16).

Four methods, each a change of config only (the weights are unchanged until the fine-tune):
- yarn: NTK-by-parts interpolation with the attention temperature, in DeepSeek-V3's own form
  (`rope_scaling` type yarn, beta_fast 32, beta_slow 1, mscale = mscale_all_dim = 1: the temperature
  goes into the softmax scale and cos/sin stay unscaled, model/config.py `softmax_scale`).
- pi: position interpolation (arXiv 2306.15595), `rope_scaling` type linear: every frequency / s.
- ntk: static NTK-aware scaling, which is only a larger `rope_theta` (model/rope.py `ntk_rope_theta`),
  so no `rope_scaling` is written. Not transformers' "dynamic" NTK, which recomputes the base from
  the current length and so disagrees with keys cached while the sequence was shorter.
- none: no scaling, only max_position_embeddings grows: the baseline that fine-tunes at the longer
  length with the pretrained frequencies, so a comparison at an equal budget isolates the scaling.
All of them load in Hugging Face transformers (DeepseekV3/V2) with the same logits; tests/test_extend.py
checks each. max_position_embeddings becomes original * factor.

The starting point (the scaled config with the source weights) is written once to STAGE/scaled/;
from there the loop, checkpoints, --resume, metrics and plots are pretraining's (`pretrain.train`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
import torch
import yaml

from nanoseek.model.checkpoint import load
from nanoseek.model.config import ModelConfig
from nanoseek.model.rope import ntk_rope_theta
from nanoseek.model.transformer import Transformer
from nanoseek.train import state as ckpt
from nanoseek.train.config import TrainConfigError, load_config
from nanoseek.train.pretrain import TrainConfig, passkey_loader, train

METHODS = ("yarn", "pi", "ntk", "none")


@dataclass
class ExtendConfig(TrainConfig):
    """A training config whose `init` is the model folder to extend by `factor` with `method`;
    `data.seq_len` is the fine-tuning length (every document is a passkey prompt and its answer
    of about that many tokens)."""

    stage: str = "extend"
    steps: int = 100
    factor: float = 4.0
    method: str = "yarn"
    # YaRN's ramp (arXiv 2309.00071 §3.2): a frequency turning more than beta_fast times over the original
    # context is kept, one turning fewer than beta_slow times is interpolated by `factor`.
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    # Log-n attention beyond the fine-tuning length (model/config.py `logn_attention_length`): longer
    # prompts spread attention over more keys than the fine-tune showed; this keeps its entropy level.
    logn: bool = False
    analysis_tasks: dict[str, list[int]] = field(default_factory=lambda: {"passkey": [0]})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise TrainConfigError(f"'method' = {self.method!r}: expected one of {METHODS}")
        if not self.factor > 1:
            raise TrainConfigError(f"'factor' = {self.factor}: must be > 1 (it multiplies the context)")
        if not 0 < self.beta_slow < self.beta_fast:
            raise TrainConfigError(f"'beta_slow' = {self.beta_slow}, 'beta_fast' = {self.beta_fast}: need "
                                   f"0 < beta_slow < beta_fast")


def scaled_config(config: ModelConfig, method: str, factor: float, beta_fast: float = 32.0,
                  beta_slow: float = 1.0) -> ModelConfig:
    """`config` with its context multiplied by `factor` through `method` (see the module docstring);
    the betas are YaRN's only."""
    if config.rope_scaling and config.rope_type != "default":
        raise TrainConfigError(f"the model already has rope_scaling {config.rope_scaling}: extend an unscaled "
                               f"model (stacking two scalings is not a method any loader knows)")
    original = config.max_position_embeddings
    longer = config.replace(max_position_embeddings=round(original * factor), rope_scaling=None)
    if method == "yarn":
        return longer.replace(rope_scaling={
            "type": "yarn", "factor": float(factor), "original_max_position_embeddings": original,
            "beta_fast": float(beta_fast), "beta_slow": float(beta_slow), "mscale": 1.0, "mscale_all_dim": 1.0})
    if method == "pi":
        return longer.replace(rope_scaling={"type": "linear", "factor": float(factor)})
    if method == "ntk":
        return longer.replace(rope_theta=ntk_rope_theta(config.rope_theta, factor, config.qk_rope_head_dim))
    if method == "none":
        return longer
    raise TrainConfigError(f"method {method!r}: expected one of {METHODS}")


def write_scaled(source: str | Path, target: Path, config: ExtendConfig) -> None:
    """The source weights under the scaled config, as a model folder (atomically). A folder already
    there is kept if it was made from the same source and scaling (a resumed run), else refused."""
    made_from = {"source": str(source), "method": config.method, "factor": config.factor,
                 "beta_fast": config.beta_fast, "beta_slow": config.beta_slow, "logn": config.logn}
    if target.exists():
        # Folders written before the betas and logn were settable had the defaults and did not record them.
        saved = {"beta_fast": 32.0, "beta_slow": 1.0, "logn": False,
                 **yaml.safe_load((target / ckpt.TRAIN_CONFIG).read_text())}
        if saved != made_from:
            raise TrainConfigError(f"{target} was scaled from another model or scaling: pick another name")
        return
    model = load(source, device="cpu", dtype=torch.float32)
    scaled_model = scaled_config(model.config, config.method, config.factor, config.beta_fast, config.beta_slow)
    if config.logn:
        scaled_model = scaled_model.replace(logn_attention_length=config.data.seq_len)
    scaled = Transformer(scaled_model)
    # RoPE frequencies are a non-persistent buffer: every stored tensor carries over unchanged.
    scaled.load_state_dict(model.state_dict())
    ckpt.save_checkpoint(target, scaled.eval(), made_from, str(source))


def extend(config: ExtendConfig, resume: bool = False) -> Path:
    """Scale `config.init`'s context by `config.factor` with `config.method` and fine-tune it on passkey
    documents of `data.seq_len` tokens; returns final/."""
    if not config.init:
        raise TrainConfigError("'init' is empty: extend needs the model folder to start from")
    scaled = config.stage_dir / "scaled"
    write_scaled(config.init, scaled, config)
    return train(dataclasses.replace(config, init=str(scaled), tokenizer=config.tokenizer or config.init),
                 passkey_loader, resume=resume)


def load_extend_config(path: str | None, overrides: list[str] | None = None) -> ExtendConfig:
    return load_config(ExtendConfig, path, overrides)
