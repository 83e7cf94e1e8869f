"""Hugging Face checkpoint layout: the one place that knows hub key names.

Reads and writes a directory with `config.json` and safetensors (single file or sharded with
`model.safetensors.index.json`): per-expert keys as on the hub, MTP depth k stored as decoder layer
`num_hidden_layers + k`, FP8 e4m3 weights with 128x128 `weight_scale_inv` blocks dequantised on load.
Only safetensors are ever read: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek.model.config import ModelConfig
from nanoseek.model.rope import inverse_frequencies
from nanoseek.model.transformer import Transformer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_SHARD_BYTES = 2 * 1024**3
STAGING_DIR = ".save.partial"  # inside the model folder: same file system, so the renames are atomic


class CheckpointError(ValueError):
    """A checkpoint that does not fit the config, or an index that names files outside its folder:
    names the tensor (and both shapes) or the index entry."""


# ---- key mapping --------------------------------------------------------------------------------
def hub_names(name: str, config: ModelConfig) -> list[str]:
    """Hub keys holding nanoseek parameter `name` (several for the fused expert tensors)."""
    layers = config.num_hidden_layers
    if name in ("lm_head.weight",):
        return [name]
    mtp = re.match(r"mtp\.(\d+)\.(.*)", name)
    if mtp:
        depth, rest = int(mtp.group(1)), mtp.group(2)
        prefix = f"model.layers.{layers + depth}."
        if rest == "norm.weight":
            return [prefix + "shared_head.norm.weight"]
        rest = rest[len("block."):] if rest.startswith("block.") else rest
        return _expert_names(prefix + rest, config)
    return _expert_names("model." + name, config)


def _expert_names(key: str, config: ModelConfig) -> list[str]:
    fused = re.match(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$", key)
    if not fused:
        return [key]
    base, which = fused.groups()
    projs = ("gate_proj", "up_proj") if which == "gate_up_proj" else ("down_proj",)
    return [f"{base}.{e}.{p}.weight" for e in range(config.n_routed_experts) for p in projs]


def to_hub(name: str, tensor: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Split one nanoseek tensor into its hub tensors."""
    keys = hub_names(name, config)
    if len(keys) == 1:
        return {keys[0]: tensor}
    if name.endswith("gate_up_proj"):
        gate, up = tensor.chunk(2, dim=1)
        parts = [t for e in range(tensor.shape[0]) for t in (gate[e], up[e])]
    else:
        parts = list(tensor.unbind(0))
    return {k: p.contiguous() for k, p in zip(keys, parts)}


def from_hub(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Fuse the hub tensors of one nanoseek parameter."""
    if len(tensors) == 1:
        return tensors[0]
    if name.endswith("gate_up_proj"):
        pairs = [torch.cat((tensors[i], tensors[i + 1]), dim=0) for i in range(0, len(tensors), 2)]
        return torch.stack(pairs)
    return torch.stack(tensors)


def _state_names(model: Transformer) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers, with a tied head reported once (as the embedding)."""
    state = dict(model.named_parameters())
    state.update((n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


# ---- reading ------------------------------------------------------------------------------------
def _index_weight_map(directory: str) -> dict[str, str]:
    """The index's tensor -> shard file map. Only bare file names are accepted: an absolute or `../`
    name would make loading read (and saving later delete) a file outside the checkpoint folder."""
    index_path = os.path.join(directory, INDEX_FILE)
    with open(index_path) as f:
        where = json.load(f)["weight_map"]
    for key, name in where.items():
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise CheckpointError(f"{index_path}: entry {key!r} names {name!r}, which is not a file in the "
                                  "checkpoint folder (only bare file names are allowed)")
    return where


class _HubReader:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, directory: str):
        self.directory = directory
        if os.path.exists(os.path.join(directory, INDEX_FILE)):
            self.where = _index_weight_map(directory)
        elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
            with safe_open(os.path.join(directory, SINGLE_FILE), "pt") as f:
                self.where = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")
        self._open: dict[str, object] = {}

    def keys(self) -> set[str]:
        return set(self.where)

    def get(self, key: str) -> torch.Tensor:
        shard = self.where[key]
        if shard not in self._open:
            path = os.path.join(self.directory, shard)
            if not os.path.exists(path):
                raise FileNotFoundError(f"checkpoint shard {path} (listed in the index for {key}) is missing")
            self._open[shard] = safe_open(path, "pt")
        return self._open[shard].get_tensor(key)

    def stored_dtype(self) -> torch.dtype:
        first = next(k for k in sorted(self.where) if k.endswith("norm.weight"))
        return self.get(first).dtype


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """W = W8 * S[i // 128, j // 128]; edge blocks are partial, so expand the scales then crop."""
    rows, cols = weight.shape
    scales = scale_inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    return weight.float() * scales


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise e4m3 quantisation (the inverse of dequantize_fp8), scale = amax / 448 per block."""
    rows, cols = weight.shape
    br, bc = -(-rows // block[0]), -(-cols // block[1])
    padded = torch.zeros(br * block[0], bc * block[1], dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(br, block[0], bc, block[1])
    scale = blocks.abs().amax(dim=(1, 3)) / 448.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero blocks
    quant = (blocks / scale[:, None, :, None]).view_as(padded)[:rows, :cols]
    return quant.to(torch.float8_e4m3fn), scale


def _fetch(reader: _HubReader, key: str, block: tuple[int, int]) -> torch.Tensor:
    tensor = reader.get(key)
    if tensor.dtype == torch.float8_e4m3fn:
        scale_key = key + "_scale_inv"
        if scale_key not in reader.where:
            raise CheckpointError(f"FP8 tensor {key} has no {scale_key}")
        tensor = dequantize_fp8(tensor, reader.get(scale_key), block)
    return tensor


def _mtp_depths_present(keys: set[str], config: ModelConfig) -> int:
    depth = 0
    while any(k.startswith(f"model.layers.{config.num_hidden_layers + depth}.") for k in keys):
        depth += 1
    return depth


def default_dtype(device: torch.device, stored: torch.dtype) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are ~100x slower there); the checkpoint's dtype elsewhere."""
    if device.type == "cpu" or stored == torch.float8_e4m3fn:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return stored


def load(path: str | os.PathLike, device: str | torch.device | None = None,
         dtype: torch.dtype | None = None) -> Transformer:
    """Load a Hugging Face-layout DeepSeek checkpoint directory into a nanoseek Transformer."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path} does not exist")
    config = ModelConfig.from_file(path)
    reader = _HubReader(path)
    keys = reader.keys()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device, reader.stored_dtype())
    if config.num_nextn_predict_layers:
        present = _mtp_depths_present(keys, config)
        if present < config.num_nextn_predict_layers:
            warnings.warn(f"config declares {config.num_nextn_predict_layers} MTP layer(s) but the checkpoint "
                          f"holds {present}; loading without the missing MTP modules", stacklevel=2)
            config = config.replace(num_nextn_predict_layers=present)
    quant = config.extra.get("quantization_config") or {}
    block = tuple(quant.get("weight_block_size", (128, 128)))

    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device=device).to(dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty makes new tensors, re-tie them
    used: set[str] = set()
    with torch.no_grad():
        for name, target in _state_names(model).items():
            names = hub_names(name, config)
            missing = [k for k in names if k not in keys]
            if missing:
                raise CheckpointError(f"missing tensor {missing[0]} (for {name}) in {path}")
            value = from_hub(name, [_fetch(reader, k, block) for k in names])
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(f"tensor {names[0] if len(names) == 1 else name}: checkpoint shape "
                                      f"{tuple(value.shape)} != model shape {tuple(target.shape)}")
            target.copy_(value)  # router weight and bias keep their fp32 target dtype
            used.update(names)
        # Non-persistent state is not in the checkpoint: rebuild it.
        model.rope.inv_freq = inverse_frequencies(config).to(device)
        for moe in model.moe_layers():
            moe.tokens_per_expert = torch.zeros(moe.num_experts, device=device)
    used.update(k + "_scale_inv" for k in list(used))
    for depth in range(len(model.mtp)):
        prefix = f"model.layers.{config.num_hidden_layers + depth}."
        used.update({prefix + "embed_tokens.weight", prefix + "shared_head.head.weight"})  # duplicates of shared ones
    if config.tie_word_embeddings:
        used.add("lm_head.weight")
    unexpected = sorted(keys - used)
    if unexpected:
        raise CheckpointError(f"unexpected tensor {unexpected[0]} in {path}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    return model.eval()


# ---- writing ------------------------------------------------------------------------------------
def hub_state_dict(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    config = model.config
    for name, tensor in _state_names(model).items():
        yield from to_hub(name, tensor.detach(), config).items()
    for depth in range(len(model.mtp)):
        prefix = f"model.layers.{config.num_hidden_layers + depth}."
        yield prefix + "embed_tokens.weight", model.embed_tokens.weight.detach()
        yield prefix + "shared_head.head.weight", model.lm_head.weight.detach()


def transformers_gaps(config: ModelConfig) -> list[str]:
    """Fields this model uses that transformers' DeepseekV3/V2 classes silently ignore."""
    gaps = []
    if config.has_moe and config.model_type == "deepseek_v3" and (
            config.scoring_func != "sigmoid" or config.topk_method != "noaux_tc"):
        gaps.append(f"scoring_func={config.scoring_func!r}, topk_method={config.topk_method!r}: transformers' "
                    "DeepseekV3 hard-codes sigmoid scoring with noaux_tc routing")
    if config.has_moe and config.model_type == "deepseek_v2":
        if config.scoring_func != "softmax" or config.topk_method == "noaux_tc":
            gaps.append(f"scoring_func={config.scoring_func!r}, topk_method={config.topk_method!r}: transformers' "
                        "DeepseekV2 implements softmax with greedy or group_limited_greedy only")
        if config.norm_topk_prob:
            gaps.append("norm_topk_prob=true: transformers' DeepseekV2 router never renormalises")
    if config.has_moe and config.moe_layer_freq != 1:
        gaps.append(f"moe_layer_freq={config.moe_layer_freq}: transformers makes every layer from "
                    "first_k_dense_replace on an MoE layer")
    if config.logn_attention_length is not None:
        gaps.append(f"logn_attention_length={config.logn_attention_length}: transformers has no log-n attention "
                    "scaling, so beyond that many tokens its logits differ")
    return gaps


def save_pretrained(model: Transformer, path: str | os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write config.json, README.md and the weights (model.safetensors, or shards of at most
    max_shard_bytes and model.safetensors.index.json) into the folder `path`, creating it if needed.

    Every other file and subfolder there (tokenizer, run files) is kept. Saving over a previous model
    is safe to interrupt: all files are first written into the subfolder `.save.partial/`, then renamed
    into place. The new shards never take the names of the previous model's shards, so the weights
    switch over at a single step (renaming in the index or model.safetensors, or deleting the index
    when shards give way to one file): until then the previous model loads, after it the new one.
    config.json and README.md follow at once (a kill in between leaves the new weights beside the
    previous config). Last, the previous model's weight files that the new one does not use are removed.
    """
    path = os.fspath(path)
    staging = os.path.join(path, STAGING_DIR)
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted save left behind
    os.makedirs(staging)
    previous = _model_files(path)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in hub_state_dict(model):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.cpu().contiguous().clone()  # safetensors refuses shared storage
        size += nbytes
    sharded = len(shards) > 1
    names = _shard_names(len(shards), previous) if sharded else [SINGLE_FILE]
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(staging, name), metadata={"format": "pt"})
    if sharded:
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
        with open(os.path.join(staging, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)

    config = model.config
    config.replace(torch_dtype=str(model.dtype).removeprefix("torch.")).save(staging)
    gaps = transformers_gaps(config)
    for gap in gaps:
        warnings.warn(f"transformers will NOT reproduce this model: {gap}", stacklevel=2)
    with open(os.path.join(staging, "README.md"), "w") as f:
        f.write(f"# nanoseek {config.model_type} checkpoint\n\nHugging Face layout: loads with "
                "`nanoseek.load(path)` and `transformers.AutoModelForCausalLM.from_pretrained(path)`.\n")
        if gaps:
            f.write("\n## WARNING: transformers computes something different\n\n"
                    + "".join(f"- {g}\n" for g in gaps))

    def publish(name: str) -> None:
        os.replace(os.path.join(staging, name), os.path.join(path, name))

    for name in names:
        publish(name)  # a new shard name, or model.safetensors (which an index present still overrides)
    if sharded:
        publish(INDEX_FILE)  # the switch
    elif INDEX_FILE in previous:
        os.remove(os.path.join(path, INDEX_FILE))  # the switch: the loader falls back to model.safetensors
    publish("config.json")
    publish("README.md")
    written = set(names) | ({INDEX_FILE} if sharded else set())
    for stale in previous - written:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, stale))
    os.rmdir(staging)


def _model_files(directory: str) -> set[str]:
    """The weight files of the model saved in `directory`: the index and the shards it names, and a
    model.safetensors (the model itself, or shadowed by an index and stale)."""
    files = {name for name in (INDEX_FILE, SINGLE_FILE) if os.path.isfile(os.path.join(directory, name))}
    if INDEX_FILE in files:
        files |= set(_index_weight_map(directory).values())
    return files


def _shard_names(count: int, taken: set[str]) -> list[str]:
    """Hugging Face's shard names, or (when the model being replaced has those very files) the same
    with a suffix: its shards must stay intact until the new index replaces its index."""
    for attempt in itertools.count():
        suffix = f"-{attempt}" if attempt else ""
        names = [f"model-{i + 1:05d}-of-{count:05d}{suffix}.safetensors" for i in range(count)]
        if taken.isdisjoint(names):
            return names
