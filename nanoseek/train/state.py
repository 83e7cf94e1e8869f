"""Training checkpoints: `step-N/` and `final/` folders that are Hugging Face model folders (weights,
config.json, tokenizer, resolved training config) plus the state to resume exactly: optimizer
moments, step, data position and RNG. Tensors go to safetensors and everything else to JSON, so
loading a checkpoint never unpickles anything.

Atomicity: a checkpoint is assembled in `<name>.partial/` and renamed into place only once complete,
so a kill at any moment leaves either the previous checkpoints or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from nanoseek.model.transformer import Transformer

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
TRAIN_CONFIG = "train_config.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
STEP_DIR = re.compile(r"step-(\d+)$")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file whole or not at all: a kill mid-write leaves the previous version."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """obj with every tensor moved into `tensors` under its dotted path and replaced by a reference."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): _split(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_checkpoint(directory: Path, model: Transformer, train_config: dict[str, Any],
                    tokenizer_dir: str | None, state: dict[str, Any] | None = None) -> None:
    """Write a self-contained model folder at `directory`, atomically. `state` (optimizer and loader
    state dicts, step, RNG...) makes it resumable; without it the folder is a plain release."""
    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    if tokenizer_dir:
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_dir) / name
            if source.exists():
                shutil.copy2(source, partial / name)
    (partial / TRAIN_CONFIG).write_text(yaml.safe_dump(train_config, sort_keys=False))
    if state is not None:
        tensors: dict[str, torch.Tensor] = {}
        meta = _split(state, "state", tensors)
        save_file(tensors, partial / STATE_TENSORS)
        (partial / STATE_JSON).write_text(json.dumps(meta))
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(partial, directory)
    shutil.rmtree(old, ignore_errors=True)


def load_state(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    if not (directory / STATE_JSON).exists():
        raise FileNotFoundError(f"{directory} holds no training state ({STATE_JSON}); it cannot be resumed")
    tensors = load_file(directory / STATE_TENSORS)
    return _join(json.loads((directory / STATE_JSON).read_text()), tensors)


def optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """Undo the JSON round trip of an optimizer state dict: its per-parameter keys are ints."""
    return {"state": {int(k): v for k, v in state["state"].items()}, "param_groups": state["param_groups"]}


def checkpoints(stage_dir: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints of a stage, oldest first (partial ones have another suffix)."""
    found = []
    for path in Path(stage_dir).glob("step-*"):
        match = STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / STATE_JSON).exists():
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune(stage_dir: Path, keep: int) -> None:
    """Keep the newest `keep` step checkpoints, and drop leftovers of interrupted writes."""
    for _, path in checkpoints(stage_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(path)
    for leftover in list(Path(stage_dir).glob("*.partial")) + list(Path(stage_dir).glob("*.old")):
        shutil.rmtree(leftover, ignore_errors=True)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
