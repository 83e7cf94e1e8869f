"""Context extension: write a RoPE scaling into a model's config, then fine-tune briefly at the longer
length on passkey documents (YaRN arXiv 2309.00071 §4: 400 steps at the new length suffice for s=16).

Three methods, each a change of config only (the weights are unchanged until the fine-tune):
- yarn: NTK-by-parts interpolation with the attention temperature, in DeepSeek-V3's own form
  (`rope_scaling` type yarn, beta_fast 32, beta_slow 1, mscale = mscale_all_dim = 1: the temperature
  goes into the softmax scale and cos/sin stay unscaled, model/config.py `softmax_scale`).
- pi: position interpolation (arXiv 2306.15595), `rope_scaling` type linear: every frequency / s.
- ntk: static NTK-aware scaling, which is only a larger `rope_theta` (model/rope.py `ntk_rope_theta`),
  so no `rope_scaling` is written. Not transformers' "dynamic" NTK, which recomputes the base from
  the current length and so disagrees with keys cached while the sequence was shorter.
All three load in Hugging Face transformers (DeepseekV3/V2) with the same logits; tests/test_extend.py
checks each. max_position_embeddings becomes original * factor.

The starting point (the scaled config with the source weights) is written once to STAGE/scaled/;
from there the loop, checkpoints, --resume, metrics and plots are pretraining's (`pretrain.train`).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from nanoseek.data.corpus import StepBatches
from nanoseek.data.passkey import Passkey, repetitions_for
from nanoseek.model.checkpoint import load
from nanoseek.model.config import ModelConfig
from nanoseek.model.rope import ntk_rope_theta
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import state as ckpt
from nanoseek.train.config import TrainConfigError, load_config
from nanoseek.train.pretrain import TrainConfig, train

METHODS = ("yarn", "pi", "ntk")


@dataclass
class ExtendConfig(TrainConfig):
    """A training config whose `init` is the model folder to extend by `factor` with `method`;
    `data.seq_len` is the fine-tuning length (every document is a passkey prompt and its answer
    of about that many tokens)."""

    stage: str = "extend"
    steps: int = 100
    factor: float = 4.0
    method: str = "yarn"
    analysis_tasks: dict[str, list[int]] = field(default_factory=lambda: {"passkey": [0]})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise TrainConfigError(f"'method' = {self.method!r}: expected one of {METHODS}")
        if not self.factor > 1:
            raise TrainConfigError(f"'factor' = {self.factor}: must be > 1 (it multiplies the context)")


def scaled_config(config: ModelConfig, method: str, factor: float) -> ModelConfig:
    """`config` with its context multiplied by `factor` through `method` (see the module docstring)."""
    if config.rope_scaling and config.rope_type != "default":
        raise TrainConfigError(f"the model already has rope_scaling {config.rope_scaling}: extend an unscaled "
                               f"model (stacking two scalings is not a method any loader knows)")
    original = config.max_position_embeddings
    longer = config.replace(max_position_embeddings=round(original * factor), rope_scaling=None)
    if method == "yarn":
        return longer.replace(rope_scaling={
            "type": "yarn", "factor": float(factor), "original_max_position_embeddings": original,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})
    if method == "pi":
        return longer.replace(rope_scaling={"type": "linear", "factor": float(factor)})
    if method == "ntk":
        return longer.replace(rope_theta=ntk_rope_theta(config.rope_theta, factor, config.qk_rope_head_dim))
    raise TrainConfigError(f"method {method!r}: expected one of {METHODS}")


class PasskeyLoader(StepBatches):
    """Rows of one passkey document each: the prompt, " KEY." and EOS, about `seq_len` tokens, the
    key at a random depth. The loss is on every token: the filler costs nothing to predict after a
    few repetitions, so the gradient comes from the key's repeats and the answer, the long-range
    retrieval the extension must learn. Batch `step` depends only on (seed, step)."""

    def __init__(self, tokenizer: Tokenizer, batch_size: int, seq_len: int, seed: int = 0):
        self.tokenizer, self.batch_size, self.seq_len, self.seed = tokenizer, batch_size, seq_len, seed
        # BOS, the "." after the key and EOS are the three tokens on top of prompt + " " + key.
        self.repetitions = repetitions_for(seq_len + 1, lambda text: len(tokenizer.encode(text + ".")) + 2)
        self.step = 0

    def document(self, seed: int, depth: int) -> list[int]:
        """At most seq_len + 1 tokens: a key that tokenizes longer than the one `repetitions_for`
        measured with costs a filler repetition, never the answer at the end."""
        tok = self.tokenizer
        for repetitions in range(self.repetitions, 0, -1):
            problem = Passkey().problem_at(repetitions, depth, seed)
            ids = [tok.bos_id] + tok.encode(f"{problem.prompt} {problem.answer}.") + [tok.eos_id]
            if len(ids) <= self.seq_len + 1:
                break
        return ids[:self.seq_len + 1]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = torch.full((self.batch_size, self.seq_len), self.tokenizer.pad_id, dtype=torch.long)
        labels = torch.full((self.batch_size, self.seq_len), -100, dtype=torch.long)
        for row in range(self.batch_size):
            rng = random.Random(f"extend:{self.seed}:{step}:{row}")
            ids = self.document(rng.getrandbits(63), rng.randint(0, 100))[:self.seq_len + 1]
            inputs[row, :len(ids) - 1] = torch.tensor(ids[:-1])
            labels[row, :len(ids) - 1] = torch.tensor(ids[1:])
        return inputs, labels

    def settings(self) -> dict[str, Any]:
        return {"seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "repetitions": self.repetitions}


def passkey_loader(config: TrainConfig, mcfg: ModelConfig) -> PasskeyLoader:
    if config.data.seq_len > mcfg.max_position_embeddings:
        raise TrainConfigError(f"'data.seq_len' = {config.data.seq_len} is beyond the extended context "
                               f"{mcfg.max_position_embeddings}")
    return PasskeyLoader(Tokenizer.load(config.tokenizer), config.data.batch_size, config.data.seq_len, config.seed)


def write_scaled(source: str | Path, target: Path, method: str, factor: float) -> None:
    """The source weights under the scaled config, as a model folder (atomically). A folder already
    there is kept if it was made from the same source, method and factor (a resumed run), else refused."""
    made_from = {"source": str(source), "method": method, "factor": factor}
    if target.exists():
        if yaml.safe_load((target / ckpt.TRAIN_CONFIG).read_text()) != made_from:
            raise TrainConfigError(f"{target} was scaled from another model, method or factor: pick another name")
        return
    model = load(source, device="cpu", dtype=torch.float32)
    scaled = Transformer(scaled_config(model.config, method, factor))
    # RoPE frequencies are a non-persistent buffer: every stored tensor carries over unchanged.
    scaled.load_state_dict(model.state_dict())
    ckpt.save_checkpoint(target, scaled.eval(), made_from, str(source))


def extend(config: ExtendConfig, resume: bool = False) -> Path:
    """Scale `config.init`'s context by `config.factor` with `config.method` and fine-tune it on passkey
    documents of `data.seq_len` tokens; returns final/."""
    if not config.init:
        raise TrainConfigError("'init' is empty: extend needs the model folder to start from")
    scaled = config.stage_dir / "scaled"
    write_scaled(config.init, scaled, config.method, config.factor)
    return train(dataclasses.replace(config, init=str(scaled), tokenizer=config.tokenizer or config.init),
                 passkey_loader, resume=resume)


def load_extend_config(path: str | None, overrides: list[str] | None = None) -> ExtendConfig:
    return load_config(ExtendConfig, path, overrides)
