"""`nanoseek pipeline` end to end on a tiny budget: every stage runs, the report holds the accuracy
table, the plots and the chat command, and a second run skips every finished stage."""

import json
import re

import pytest

from nanoseek import cli
from nanoseek.model.checkpoint import load
from nanoseek.pipeline import STAGES, load_pipeline_config, run_pipeline
from test_train import TINY_MODEL

TINY = ["name=tiny", "tasks={arithmetic: [1], countdown: [3]}", "tokenizer_vocab_size=300", "tokenizer_problems=40",
        "corpus_problems=100", "eval_problems=3", "max_new_tokens=24", "pretrain." + TINY_MODEL,
        "pretrain.steps=6", "pretrain.save_every=3", "pretrain.data.seq_len=32", "pretrain.data.batch_size=4",
        "pretrain.threads=1", "pretrain.peak_flops=1e11", "pretrain.progress=false", "pretrain.tensorboard=false",
        "pretrain.analysis_problems=4"]


@pytest.mark.slow
def test_pipeline_end_to_end_and_resumable(tmp_path, capsys):
    overrides = [f"out_dir={tmp_path}", *TINY]
    report = run_pipeline(load_pipeline_config(None, overrides))
    run = tmp_path / "tiny"
    assert report == run / "report.md"
    text = report.read_text()
    final = run / "pretrain" / "final"
    assert text.rstrip().endswith("```") and f"nanoseek chat {final}" in text
    # up to 3 distinct held-out problems per task difficulty (repeated draws are evaluated once)
    assert re.search(r"\| arithmetic \| 1 \| [123] \|", text) and re.search(r"\| countdown \| 3 \| [123] \|", text)
    for png in ("loss.png", "expert_load.png", "expert_specialisation.png"):
        assert (run / "pretrain" / png).stat().st_size > 0 and f"pretrain/{png}" in text
    data = json.loads((run / "report.json").read_text())
    assert list(data["stages"]) == [name for name, _ in STAGES]
    for task in ("arithmetic", "countdown"):
        result = data["stages"]["eval"]["tasks"][task]
        assert 0 <= result["strict"] <= result["lenient"] <= 1
    layers = data["stages"]["pretrain"]["specialisation"]
    assert len(layers) == 2 and all(0 <= layer["task"]["nmi"] <= 1 for layer in layers)
    assert load(final, device="cpu").config.num_hidden_layers == 3

    capsys.readouterr()
    cli.main(["pipeline", *overrides])  # again, through the CLI: everything is already done
    out = capsys.readouterr().out
    assert out.count("skipped, already done") == len(STAGES)
    assert f"chat with the model: nanoseek chat {final}" in out
