"""`nanoseek pipeline --preset smoke` end to end: every stage runs, the report holds every stage's
held-out metrics, the RL curves and the chat command, the models learn a little (weak assertions:
SFT writes the R1 format more often than the base model; GRPO's mean reward over its last steps is
above its first, on a smoke reward that weighs the format as much as accuracy), and a second run
skips every finished stage."""

import json

import pytest
import torch
from safetensors.torch import load_file

from nanoseek import cli
from nanoseek.pipeline import (MODEL_STAGES, STAGE_RECORD, STAGES, Run, StaleStageError, check_stage, force_from,
                               load_pipeline_config, run_pipeline, stage_values)
from nanoseek.model.config import ModelConfig
from nanoseek.model.transformer import Transformer
from nanoseek.train.config import TrainConfigError
from nanoseek.train.metrics import read_metrics


PROGRESS_OFF = [f"{stage}.progress=false" for stage in ("pretrain", "sft", "grpo", "grpo_zero", "grpo2", "distill")]


def on_the_grid(value: float, count: int) -> bool:
    """value is a whole number of 1/count-ths (a rate over `count` scored items)."""
    return abs(value * count - round(value * count)) < 1e-6


@pytest.mark.slow
def test_smoke_pipeline_end_to_end_and_resumable(tmp_path, capsys):
    overrides = [f"out_dir={tmp_path}", *PROGRESS_OFF, "pretrain.tensorboard=false", "sft.tensorboard=false",
                 "distill.tensorboard=false"]
    config = load_pipeline_config(None, overrides, preset="smoke")
    report = run_pipeline(config)
    run = tmp_path / "smoke"
    assert report == run / "report.md"
    data = json.loads((run / "report.json").read_text())
    stages = data["stages"]
    assert list(stages) == [stage.name for stage in STAGES]
    samples = config.eval.samples
    for name in MODEL_STAGES:
        s = stages[name]
        assert s["n"] == 24 and s["mean_tokens"] > 0 and s["params_active"] < s["params_total"] and s["wall_s"] > 0
        assert on_the_grid(s["pass@1"], 24 * samples) and on_the_grid(s["greedy"], 24), name
        assert on_the_grid(s["format"], 24 * samples), name
        assert s["pass@8"] >= s["pass@1"] and s["pass@1_lenient"] >= s["pass@1"], name
        p = s["pass@1"]
        assert s["pass@1_stderr"] <= (p * (1 - p) / 23) ** 0.5 + 1e-9, name  # per-problem means vary less than samples
    assert stages["corpus"]["eval_prompts_in_corpus"] == 0
    # weak learning signals
    assert stages["sft"]["format"] > stages["pretrain"]["format"]
    records = [r for r in read_metrics(run / "grpo" / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in records] == list(range(records[0]["steps"]))
    assert sum(r["reward"] for r in records[-5:]) > sum(r["reward"] for r in records[:5])  # GRPO's reward rises
    sft_weights, grpo_weights = (load_file(str(run / stage / "final" / "model.safetensors")) for stage in ("sft", "grpo"))
    assert any(not torch.equal(sft_weights[k], grpo_weights[k]) for k in sft_weights)  # GRPO moved the policy
    # the second round and the students
    sample = stages["sample"]
    assert sample["accepted"] == sum(1 for _ in (run / "data" / "sample.jsonl").open())
    assert stages["sft2"]["conversations"] == sample["accepted"] + stages["sft_data"]["cold_start"]
    teacher, student = stages["grpo2"], stages["student_distill"]
    assert student["params_active"] == stages["student_rl"]["params_active"] < teacher["params_active"]
    distill_data = sum(1 for _ in (run / "data" / "student_distill.jsonl").open())
    assert distill_data == student["teacher_samples"] + stages["sft_data"]["cold_start"] and student["steps"] >= 1
    text = report.read_text()
    for row in ("| grpo |", "| sft_control |", "grpo_zero (R1-Zero prompt)", "| sft2 |", "| grpo2 |",
                "| student_distill |", "| student_rl |", "## Rejection sampling", "## Teacher and students"):
        assert row in text, row
    assert "![RL curves](rl_curves.png)" in text and (run / "rl_curves.png").stat().st_size > 0
    assert f"nanoseek chat {run / 'grpo2' / 'final'}" in text

    capsys.readouterr()
    cli.main(["pipeline", "--preset", "smoke", *overrides])  # again, through the CLI: everything is already done
    out = capsys.readouterr().out
    assert out.count("skipped, already done") == len(STAGES)
    assert json.loads((run / "report.json").read_text())["stages"]["grpo"]["pass@1"] == stages["grpo"]["pass@1"]


TINY_DATA = ["tokenizer_problems=20", "corpus_problems=20", "eval_problems=5"]


def stale_run(tmp_path, *changes: str):
    """A run folder whose stages tokenizer..pretrain were recorded without `changes`."""
    config = load_pipeline_config(None, [f"out_dir={tmp_path}", "name=r", *TINY_DATA, *changes])
    run = Run(config, tmp_path / "r")
    recorded = {stage.name: stage_values(load_pipeline_config(None, TINY_DATA), stage) for stage in STAGES[:3]}
    for stage in STAGES:
        for out in stage.outputs:
            (run.dir / out).parent.mkdir(parents=True, exist_ok=True)
            (run.dir / out).write_text("made earlier") if "." in out else (run.dir / out).mkdir(exist_ok=True)
    (run.dir / STAGE_RECORD).write_text(json.dumps(recorded))
    return config, run, recorded


def test_a_stage_done_with_other_settings_stops_the_run_naming_the_keys_and_the_ways_forward(tmp_path):
    config, run, recorded = stale_run(tmp_path, "pretrain.steps=900", "pretrain.optimizer.lr=1e-3")
    default = load_pipeline_config(None, []).pretrain
    with pytest.raises(StaleStageError) as error:
        run_pipeline(config)
    message = str(error.value)
    assert f"pretrain.steps: {default.steps} -> 900" in message
    assert f"pretrain.optimizer.lr: {default.optimizer.lr:.4g} -> 0.001" in message
    assert "name=NEW_NAME" in message and "--force pretrain" in message
    assert (run.dir / "pretrain").exists()  # nothing was removed or retrained


def test_force_redoes_the_stage_and_everything_after_it(tmp_path):
    _, run, recorded = stale_run(tmp_path, "pretrain.steps=900")
    force_from(run, "pretrain", recorded)
    assert list(recorded) == ["tokenizer", "corpus"]
    assert (run.dir / "tokenizer").exists() and (run.dir / "data").exists()
    later = [out for stage in STAGES[2:] for out in stage.outputs]
    assert later and not any((run.dir / out).exists() for out in later)
    check_stage(run, STAGES[0], recorded)  # the stages before it still match today's settings
    with pytest.raises(TrainConfigError, match="no such stage"):
        force_from(run, "pretrian", recorded)


def test_default_student_has_at_most_a_third_of_the_teachers_active_parameters():
    config = load_pipeline_config(None, [])

    def active(fields: dict) -> int:
        with torch.device("meta"):
            model = Transformer(ModelConfig.from_hf_dict({**fields, "vocab_size": config.tokenizer_vocab_size}))
        return model.num_parameters()["active"]

    assert 0 < active(config.student) <= active(config.pretrain.model) / 3
