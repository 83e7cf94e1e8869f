"""kill -9 of a real training process, then --resume: the per-step losses are bitwise those of the
run that was never interrupted (CPU, same thread count)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanoseek.train.metrics import read_metrics
from test_train import corpus, tiny_overrides  # noqa: F401 (corpus is a fixture)

STEPS, SAVE_EVERY = 40, 5


def command(root: Path, corpus, name: str, resume: bool) -> list[str]:
    overrides = tiny_overrides(root, corpus, f"name={name}", f"steps={STEPS}", f"save_every={SAVE_EVERY}",
                               "keep_last=2", "threads=1", "data.seq_len=64")
    return [sys.executable, "-m", "nanoseek.cli", "pretrain", *overrides] + (["--resume"] if resume else [])


def losses(stage: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(stage / "metrics.jsonl")]


def run_and_kill(cmd: list[str], stage: Path, when: str, rng: random.Random) -> bool:
    """Start training and kill -9 it once it has a checkpoint: at a random moment, or as soon as a
    checkpoint write is in flight. Returns whether it was killed before finishing."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(stage.glob("step-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if when == "random":
            time.sleep(rng.uniform(0.0, 0.5))
        else:  # poll for the temporary folder of a checkpoint being written
            while proc.poll() is None and not list(stage.glob("*.partial*")) and time.monotonic() < deadline:
                time.sleep(0.0005)
        killed = proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    return killed


@pytest.mark.slow
def test_kill_minus_9_then_resume_reproduces_the_uninterrupted_losses(tmp_path, corpus):
    reference = subprocess.run(command(tmp_path, corpus, "ref", False), capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected = losses(tmp_path / "ref" / "pretrain")
    assert len(expected) == STEPS

    stage = tmp_path / "killed" / "pretrain"
    rng = random.Random()
    kills = 0
    # First launch is fresh; every later one resumes. Kill twice: once at a random moment after the
    # first checkpoint, once during a checkpoint write; then let it finish.
    kills += run_and_kill(command(tmp_path, corpus, "killed", False), stage, "random", rng)
    kills += run_and_kill(command(tmp_path, corpus, "killed", True), stage, "during-write", rng)
    assert kills >= 1, "training finished before any kill landed"
    finish = subprocess.run(command(tmp_path, corpus, "killed", True), capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert losses(stage) == expected  # bitwise: floats compared exactly
    assert (stage / "final" / "model.safetensors").exists()
    assert not list(stage.glob("*.partial*")) and not list(stage.glob("*.old"))
