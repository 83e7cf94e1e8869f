"""`nanoseek pipeline --preset smoke` end to end: every stage runs, the report holds every stage's
held-out metrics, the RL curves and the chat command, the models learn a little (weak assertions:
SFT writes the R1 format more often than the base model; GRPO gets some reward and moves the policy;
its reward trend is too noisy at smoke size to assert, the GRPO trainer tests check learning), and a second run
skips every finished stage."""

import json

import pytest
import torch
from safetensors.torch import load_file

from nanoseek import cli
from nanoseek.pipeline import MODEL_STAGES, STAGES, load_pipeline_config, run_pipeline
from nanoseek.train.metrics import read_metrics


@pytest.mark.slow
def test_smoke_pipeline_end_to_end_and_resumable(tmp_path, capsys):
    overrides = [f"out_dir={tmp_path}", "pretrain.progress=false", "sft.progress=false", "grpo.progress=false",
                 "grpo_zero.progress=false", "pretrain.tensorboard=false", "sft.tensorboard=false"]
    report = run_pipeline(load_pipeline_config(None, overrides, preset="smoke"))
    run = tmp_path / "smoke"
    assert report == run / "report.md"
    data = json.loads((run / "report.json").read_text())
    stages = data["stages"]
    assert list(stages) == [name for name, _ in STAGES]
    for name in MODEL_STAGES:
        s = stages[name]
        for key in ("pass@1", "pass@1_stderr", "pass@8", "maj@8", "greedy", "format"):
            assert 0.0 <= s[key] <= 1.0, (name, key)
        assert s["n"] == 24 and s["mean_tokens"] > 0 and s["params_active"] < s["params_total"] and s["wall_s"] > 0
    assert stages["corpus"]["eval_prompts_in_corpus"] == 0
    # weak learning signals
    assert stages["sft"]["format"] > stages["pretrain"]["format"]
    records = [r for r in read_metrics(run / "grpo" / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in records] == list(range(records[0]["steps"]))
    assert any(r["reward"] > 0 for r in records)  # some reward signal reached the policy
    sft_weights, grpo_weights = (load_file(str(run / stage / "final" / "model.safetensors")) for stage in ("sft", "grpo"))
    assert any(not torch.equal(sft_weights[k], grpo_weights[k]) for k in sft_weights)  # GRPO moved the policy
    text = report.read_text()
    assert "| grpo |" in text and "| sft_control |" in text and "grpo_zero (R1-Zero prompt)" in text
    assert "![RL curves](rl_curves.png)" in text and (run / "rl_curves.png").stat().st_size > 0
    assert f"nanoseek chat {run / 'grpo' / 'final'}" in text

    capsys.readouterr()
    cli.main(["pipeline", "--preset", "smoke", *overrides])  # again, through the CLI: everything is already done
    out = capsys.readouterr().out
    assert out.count("skipped, already done") == len(STAGES)
    assert json.loads((run / "report.json").read_text())["stages"]["grpo"]["pass@1"] == stages["grpo"]["pass@1"]
