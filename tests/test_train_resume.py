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


def run_and_kill(cmd: list[str], stage: Path, kill_step: int, during_write: bool) -> None:
    """Start training and kill -9 it once `kill_step` steps are logged or, with during_write, at the
    first checkpoint write in flight after that. Fails if training ended before the kill landed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(losses(stage)) < kill_step and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        while (during_write and not list(stage.glob("*.partial*")) and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.0005)
        alive = proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert alive, f"training ended before the planned kill at step {kill_step} (during a write: {during_write})"
    assert len(losses(stage)) < STEPS


@pytest.mark.slow
def test_kill_minus_9_then_resume_reproduces_the_uninterrupted_losses(tmp_path, corpus):
    reference = subprocess.run(command(tmp_path, corpus, "ref", False), capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected = losses(tmp_path / "ref" / "pretrain")
    assert len(expected) == STEPS

    # Kill points drawn from a fixed seed, so every run plays the same scenario: the first launch is
    # killed mid-run after its first checkpoint, the resumed one during a later checkpoint write; a
    # third launch resumes again and finishes.
    rng = random.Random(1234)
    first_kill = rng.randint(SAVE_EVERY + 1, STEPS // 2 - 1)
    second_kill = rng.randint(STEPS // 2, STEPS - 2 * SAVE_EVERY)
    stage = tmp_path / "killed" / "pretrain"
    run_and_kill(command(tmp_path, corpus, "killed", False), stage, first_kill, during_write=False)
    run_and_kill(command(tmp_path, corpus, "killed", True), stage, second_kill, during_write=True)
    finish = subprocess.run(command(tmp_path, corpus, "killed", True), capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert losses(stage) == expected  # bitwise: floats compared exactly
    assert (stage / "final" / "model.safetensors").exists()
    assert not list(stage.glob("*.partial*")) and not list(stage.glob("*.old"))
