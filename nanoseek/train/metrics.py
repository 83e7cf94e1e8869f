"""Where per-step metrics go. Sinks are pluggable: the training loop hands every record to each sink
and never asks which ones are on. metrics.jsonl is always written; TensorBoard only if installed."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm


class MetricSink(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per optimizer step, flushed each line so a killed run keeps what it logged."""

    def __init__(self, path: Path, keep_until_step: int | None = None):
        """keep_until_step: on resume, keep the records of steps < it (those the checkpoint covers)
        and drop the rest, which the resumed run will log again."""
        kept = read_metrics(path) if keep_until_step is not None else []
        kept = [r for r in kept if r["step"] < (keep_until_step or 0)]
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, path)
        self.file = open(path, "a")

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a last line cut short by a kill is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def format_line(r: dict[str, Any]) -> str:
    """step | loss | lr | grad norm | tok/s | MFU | expert imbalance | eta, fixed width for grep."""
    imbalance = f"{r['imbalance']:.2f}" if r.get("imbalance") is not None else "-"
    return (f"step {r['step'] + 1:>6}/{r['steps']} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
            f"grad norm {r['grad_norm']:.3f} | tok/s {r['tok_per_s']:,.0f} | MFU {100 * r['mfu']:.1f}% | "
            f"imbalance {imbalance} | eta {_duration(r['eta_s'])}")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ConsoleSink:
    """The step line every `every` steps and at the last one, on stdout; on a terminal, a tqdm progress
    bar below it. A bar redraws itself with a carriage return per step, which in a file or pipe (CI,
    nohup, `> log.txt`) is a line of log per step: there only the step lines are written."""

    def __init__(self, total: int, initial: int, every: int = 1, progress: bool = True):
        self.every = every
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                        disable=not (progress and sys.stderr.isatty()))  # tqdm draws on stderr

    def log(self, record: dict[str, Any]) -> None:
        if (record["step"] + 1) % self.every == 0 or record["step"] + 1 == record["steps"]:
            tqdm.write(format_line(record))
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def log(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(f"train/{key}", value, record["step"] + 1)

    def close(self) -> None:
        self.writer.close()


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None
