"""The pretraining loop: next-token + MTP loss on memory-mapped token shards, AdamW with warmup and
cosine/WSD decay, gradient accumulation and clipping, MoE balancing, atomic resumable checkpoints.

Exact resume: every source of change between steps is in a checkpoint (weights and router bias,
AdamW moments and step counts, the loader's step counter, the RNG), each batch depends only on
(seed, step), and checkpoints are taken between optimizer steps, so a run killed at any point and
resumed computes the same per-step losses as one that never stopped (bitwise on CPU with the same
thread count; a test checks it).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal, Protocol

import torch

from nanoseek.data.corpus import TokenLoader, TokenShardDataset
from nanoseek.data.passkey import PasskeyLoader
from nanoseek.model.attention import MultiHeadLatentAttention
from nanoseek.model.checkpoint import load
from nanoseek.model.config import ModelConfig
from nanoseek.model.moe import MLP
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import state as ckpt
from nanoseek.train.balance import BalanceConfig, ExpertLoad, set_aux_loss, update_expert_bias
from nanoseek.train.config import TrainConfigError, load_config, to_dict
from nanoseek.train.flops import flops_per_token, peak_flops
from nanoseek.train.metrics import ConsoleSink, JsonlSink, MetricSink, TensorBoardSink, tensorboard_available
from nanoseek.train.optim import OptimizerConfig, build_optimizer, lr_at


@dataclass
class DataConfig:
    path: str = ""  # a shard directory written by nanoseek.data.corpus (index.json + shard_*.bin)
    # "shards": windows of `path`; "passkey": generated passkey documents of seq_len tokens, one a
    # row (a base model for context-extension experiments, which needs no corpus on disk).
    source: Literal["shards", "passkey"] = "shards"
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    shuffle: bool = True
    # passkey: the shortest document as a fraction of seq_len (data/passkey.py PasskeyLoader).
    min_fill: float = 0.0
    # passkey: 0, or the rope positions a row's tokens spread over by PoSE's skips (PasskeyLoader).
    pose_length: int = 0


@dataclass
class TrainConfig:
    name: str = "run"  # the run folder is out_dir/name/stage
    out_dir: str = "runs"
    stage: str = "pretrain"
    # A model config.json path (Hugging Face format), or its fields inline. Without vocab_size the
    # tokenizer's size is used; bos/eos/pad ids always come from the tokenizer when there is one.
    model: str | dict = field(default_factory=dict)
    init: str = ""  # a model folder to start from (fine-tuning: SFT); its config replaces `model`
    tokenizer: str = ""  # directory with tokenizer.json, copied into every checkpoint
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    steps: int = 200
    seed: int = 0
    mtp_weight: float = 0.3  # lambda of the MTP loss (V3: 0.3, then 0.1); needs num_nextn_predict_layers
    init_std: float | None = None  # weight init std; None = the model config's initializer_range
    device: str = "auto"  # auto = cuda if available, else cpu
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    gradient_checkpointing: bool = False
    threads: int = 0  # torch.set_num_threads when > 0 (bitwise CPU resume needs the same count)
    save_every: int = 100  # optimizer steps between checkpoints; 0 = only final/
    keep_last: int = 2
    log_every: int = 1  # console lines; metrics.jsonl gets every step
    progress: bool = True
    tensorboard: bool = True  # used only if tensorboard is installed
    peak_flops: float = 0.0  # MFU denominator; 0 = measure a matmul at start
    # Eval problems routed for the expert-specialisation plot: task -> difficulties ([] = all of them).
    analysis_tasks: dict[str, list[int]] = field(default_factory=lambda: {"arithmetic": [1, 2], "countdown": [3]})
    analysis_problems: int = 32  # per task
    eval_every: int = 0  # optimizer steps between the stage's periodic evaluation (0 = none)

    def __post_init__(self) -> None:
        for name in ("steps", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"'{name}' = {getattr(self, name)}: must be >= 1")
        if self.data.seq_len < 1 or self.data.batch_size < 1 or self.data.grad_accum < 1:
            raise TrainConfigError("'data.seq_len', 'data.batch_size' and 'data.grad_accum' must be >= 1")
        if self.save_every < 0 or self.eval_every < 0:
            raise TrainConfigError("'save_every' and 'eval_every' must be >= 0")

    @property
    def stage_dir(self) -> Path:
        return Path(self.out_dir) / self.name / self.stage


def model_config(config: TrainConfig, vocab_size: int | None, special: dict[str, int]) -> ModelConfig:
    if isinstance(config.model, str):
        if not config.model:
            raise TrainConfigError("'model' is empty: give a config.json path or the model fields inline")
        model = ModelConfig.from_file(config.model)
    else:
        fields = dict(config.model)
        if vocab_size is not None:
            fields.setdefault("vocab_size", vocab_size)
        model = ModelConfig.from_hf_dict(fields)
    if vocab_size is not None and model.vocab_size < vocab_size:
        raise TrainConfigError(f"'model.vocab_size' = {model.vocab_size} is smaller than the tokenizer's "
                               f"{vocab_size} tokens")
    return model.replace(**special) if special else model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    # bf16 matmuls are ~100x slower than fp32 on CPUs without AMX (docs/facts.md §13): auto stays fp32 there.
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _tokenizer_info(path: str) -> tuple[int | None, dict[str, int]]:
    if not path:
        return None, {}
    tok = Tokenizer.load(path)
    return tok.vocab_size, {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


class BatchSource(Protocol):
    """What the loop trains on: (inputs, labels) pairs, labels -100 where no loss is taken, each
    batch a function of (seed, step) so that the state to resume is the step counter."""

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...



# (config, model config) -> the batches to train on.
LoaderFactory = Callable[[TrainConfig, ModelConfig], BatchSource]
# (model, steps done) -> metrics merged into that step's record; the model is in eval mode meanwhile.
Evaluator = Callable[[Transformer, int], dict[str, Any]]
# (model, inputs, labels) -> {"loss": what to backpropagate, **parts to log}, in place of the model's
# own next-token loss (logit-level distillation). One that samples must draw from the global RNG:
# checkpoints save and restore it, so a resumed run draws the same.
LossFunction = Callable[[Transformer, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def shard_loader(config: TrainConfig, mcfg: ModelConfig) -> TokenLoader:
    """Pretraining batches: windows of the memory-mapped token shards at `data.path`."""
    dataset = TokenShardDataset(config.data.path)
    if dataset.vocab_size > mcfg.vocab_size:
        raise TrainConfigError(f"data '{config.data.path}' has vocab size {dataset.vocab_size} > model "
                               f"vocab_size {mcfg.vocab_size}")
    return TokenLoader(dataset, config.data.batch_size, config.data.seq_len, seed=config.seed,
                       shuffle=config.data.shuffle)


def passkey_loader(config: TrainConfig, mcfg: ModelConfig) -> PasskeyLoader:
    """Batches of passkey documents (data/passkey.py `PasskeyLoader`) of `data.seq_len` tokens."""
    if config.data.seq_len > mcfg.max_position_embeddings:
        raise TrainConfigError(f"'data.seq_len' = {config.data.seq_len} is beyond the model's context "
                               f"{mcfg.max_position_embeddings}")
    if not 0 <= config.data.min_fill <= 1:
        raise TrainConfigError(f"'data.min_fill' = {config.data.min_fill}: must be in [0, 1] (a fraction of seq_len)")
    pose = config.data.pose_length
    if pose and not config.data.seq_len <= pose <= mcfg.max_position_embeddings:
        raise TrainConfigError(f"'data.pose_length' = {pose}: must be 0 (off) or between data.seq_len "
                               f"({config.data.seq_len}) and the model's context ({mcfg.max_position_embeddings})")
    return PasskeyLoader(Tokenizer.load(config.tokenizer), config.data.batch_size, config.data.seq_len, config.seed,
                         config.data.min_fill, pose)


def pretrain(config: TrainConfig, resume: bool = False) -> Path:
    """Pretrain per `config` on token shards (or on passkey documents, `data.source=passkey`); returns
    the final/ model folder. With resume, continue from the newest step checkpoint of the run folder
    (or start fresh if there is none)."""
    return train(config, passkey_loader if config.data.source == "passkey" else shard_loader, resume=resume)


def train(config: TrainConfig, loader: LoaderFactory, resume: bool = False, evaluate: Evaluator | None = None,
          loss: LossFunction | None = None) -> Path:
    """The loop every supervised stage shares (pretraining, SFT, sequence- and logit-level
    distillation): only where the batches come from, and for logit-level distillation the loss,
    differ. Returns the final/ model folder."""
    threads = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, loader, resume, evaluate, loss)
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig, make_loader: LoaderFactory, resume: bool, evaluate: Evaluator | None,
           loss: LossFunction | None) -> Path:
    stage_dir = config.stage_dir
    device = resolve_device(config.device)
    resolved = to_dict(config)
    vocab_size, special = _tokenizer_info(config.tokenizer)
    if config.init:
        mcfg = ModelConfig.from_file(Path(config.init) / "config.json")
    else:
        mcfg = model_config(config, vocab_size, special)
    resolved["model"] = mcfg.to_hf_dict()
    resolved = json.loads(json.dumps(resolved))  # plain lists and dicts, as the checkpoint stores them

    if resume and (stage_dir / "final").exists():
        print(f"{stage_dir / 'final'} exists: this run has finished, nothing to resume")
        return stage_dir / "final"
    latest = ckpt.checkpoints(stage_dir)[-1] if resume and ckpt.checkpoints(stage_dir) else None
    if not resume and (ckpt.checkpoints(stage_dir) or (stage_dir / "metrics.jsonl").exists()):
        raise ValueError(f"{stage_dir} already holds a run: pass --resume to continue it, or pick another name")
    stage_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)
    if latest is None and config.init:
        model = load(config.init, device=device, dtype=torch.float32)
        start_step, saved = 0, None
    elif latest is None:
        model = Transformer(mcfg).to(device)
        model.init_weights(config.init_std)
        start_step, saved = 0, None
    else:
        saved = ckpt.load_state(latest[1])
        _check_same_config(saved["train_config"], resolved, latest[1])
        model = load(latest[1], device=device, dtype=torch.float32)
        start_step = saved["step"]
    model.train()
    model.gradient_checkpointing = config.gradient_checkpointing
    set_aux_loss(model, config.balance.aux_loss_alpha)
    optimizer = build_optimizer(model, config.optimizer)
    loader = make_loader(config, mcfg)
    if saved is not None:
        optimizer.load_state_dict(ckpt.optimizer_state(saved["optimizer"]))
        loader.load_state_dict(saved["loader"])
        ckpt.set_rng_state(saved["rng"], device)
    ckpt.prune(stage_dir, config.keep_last)

    with_mtp = config.mtp_weight > 0 and len(model.mtp) > 0
    # Counted from the batches: SFT batches are as long as their longest conversation.
    tokens_seen = saved.get("tokens", 0) if saved is not None else 0
    flops = flops_per_token(model, config.data.seq_len, with_mtp)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    peak = config.peak_flops or peak_flops(device, torch.bfloat16 if bf16 else torch.float32, sizes=(2048,),
                                           repeats=3)
    sinks: list[MetricSink] = [JsonlSink(stage_dir / "metrics.jsonl", keep_until_step=start_step),
                               ConsoleSink(config.steps, start_step, config.log_every, config.progress)]
    if config.tensorboard and tensorboard_available():
        sinks.append(TensorBoardSink(stage_dir / "tensorboard"))

    if config.compile:
        compile_blocks(model)
    expert_load = ExpertLoad(model, with_mtp)
    params = [p for p in model.parameters() if p.requires_grad]
    bias_until = round(config.balance.bias_update_until * config.steps)
    started, timed_steps = time.perf_counter(), 0
    try:
        for step in range(start_step, config.steps):
            step_start = time.perf_counter()
            lr = lr_at(step, config.steps, config.optimizer)
            for group in optimizer.param_groups:
                group["lr"] = lr
            expert_load.reset()
            parts: dict[str, float] = {}
            step_tokens = 0
            for _ in range(config.data.grad_accum):
                # A loader may add rope position ids (PoSE) to (inputs, labels).
                inputs, labels, *position_ids = (t.to(device, non_blocking=True) for t in next(loader))
                step_tokens += inputs.numel()
                with autocast(device, config.precision):
                    if loss is not None:
                        out = loss(model, inputs, labels)
                    else:
                        out = model.compute_loss(inputs, labels, config.mtp_weight if with_mtp else 0.0,
                                                 position_ids=position_ids[0] if position_ids else None)
                (out["loss"] / config.data.grad_accum).backward()
                expert_load.accumulate()
                for key, value in out.items():
                    parts[key] = parts.get(key, 0.0) + float(value.detach()) / config.data.grad_accum
            clip = config.optimizer.grad_clip if config.optimizer.grad_clip > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_expert_bias(expert_load, config.balance.bias_update_rate if step < bias_until else 0.0)

            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - step_start
            tokens_seen += step_tokens
            timed_steps += 1
            per_step = (time.perf_counter() - started) / timed_steps
            imbalance = expert_load.imbalance()
            done = step + 1
            evaluated = {}
            if evaluate is not None and config.eval_every and (done % config.eval_every == 0 or done == config.steps):
                model.eval()
                evaluated = evaluate(model, done)
                model.train()
            record: dict[str, Any] = {
                "step": step, "steps": config.steps, **parts, "lr": lr, "grad_norm": grad_norm,
                "tokens": tokens_seen, "tok_per_s": step_tokens / elapsed,
                "mfu": step_tokens / elapsed * flops / peak, "step_s": elapsed,
                "eta_s": per_step * (config.steps - step - 1),
                "imbalance": sum(imbalance) / len(imbalance) if imbalance else None,
                "imbalance_per_layer": imbalance, "expert_load": expert_load.fractions(),
                "moe_layers": expert_load.names, **evaluated,
            }
            for sink in sinks:
                sink.log(record)
            if config.save_every and done % config.save_every == 0 and done < config.steps:
                state = {"step": done, "tokens": tokens_seen, "optimizer": optimizer.state_dict(),
                         "loader": loader.state_dict(), "rng": ckpt.rng_state(device), "train_config": resolved}
                ckpt.save_checkpoint(stage_dir / f"step-{done}", model, resolved, config.tokenizer, state)
                ckpt.prune(stage_dir, config.keep_last)
    finally:
        for sink in sinks:
            sink.close()

    final = stage_dir / "final"
    model.eval()
    ckpt.save_checkpoint(final, model, resolved, config.tokenizer)
    from nanoseek.train.plots import write_plots

    write_plots(stage_dir, model, config)
    return final


def compile_blocks(model: Transformer) -> None:
    """torch.compile the attention and dense MLP modules in place (torchtitan compiles per block too).
    Routed-expert dispatch stays eager: its per-expert token counts change every step, and a graph
    over them would recompile for each new count."""
    for module in model.modules():
        if isinstance(module, (MultiHeadLatentAttention, MLP)):
            module.compile()


def _check_same_config(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Resuming under a different config would silently train something else: refuse, naming keys."""
    def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            return {k: v for key, value in d.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): d}

    a, b = flatten(saved), flatten(current)
    # Logging and output options may change between the two halves of a run.
    free = {"progress", "log_every", "tensorboard", "peak_flops", "keep_last", "analysis_problems"}
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k.split(".")[0] not in free)
    if changed:
        raise TrainConfigError(f"cannot resume from {where}: config differs in {', '.join(changed)}")


def load_train_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)
