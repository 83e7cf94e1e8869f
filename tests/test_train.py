"""The training loop's parts: schedule, balancing update, checkpoint state round trip, exact resume,
gradient accumulation, compile, the specialisation statistics and the run-folder layout."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import random_model, tiny_config
from nanoseek.data import get_task
from nanoseek.data.corpus import build_task_corpus
from nanoseek.model.checkpoint import load
from nanoseek.tokenizer import Tokenizer, train_tokenizer
from nanoseek.train import load_train_config, pretrain
from nanoseek.train import state as ckpt
from nanoseek.train.balance import ExpertLoad, update_expert_bias
from nanoseek.train.flops import flops_per_token
from nanoseek.train.metrics import read_metrics
from nanoseek.train.optim import OptimizerConfig, build_optimizer, lr_at
from nanoseek.train.specialization import labelled_conversation, normalized_mutual_information

TINY_MODEL = ("model={hidden_size: 32, intermediate_size: 64, moe_intermediate_size: 16, num_hidden_layers: 3, "
              "num_attention_heads: 2, q_lora_rank: 16, kv_lora_rank: 16, qk_nope_head_dim: 8, qk_rope_head_dim: 8, "
              "v_head_dim: 8, n_routed_experts: 8, num_experts_per_tok: 2, num_nextn_predict_layers: 1}")


def tiny_corpus(root: Path) -> tuple[Path, Path]:
    """A tokenizer and token shards of 1-digit arithmetic, built in-process in about a second."""
    task = get_task("arithmetic")
    from nanoseek.data import sample

    texts = [f"{p.prompt}\n{task.render_solution(p)}" for p in sample(task, "train", 200, 0, 1)]
    tok_dir, data_dir = root / "tok", root / "data"
    train_tokenizer(texts, 300).save(tok_dir)
    one_digit = type(task)()
    one_digit.difficulties = [1]
    build_task_corpus(Tokenizer.load(tok_dir), data_dir, [one_digit], 300)
    return tok_dir, data_dir


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("corpus"))


def tiny_overrides(root: Path, corpus, *extra: str) -> list[str]:
    tok_dir, data_dir = corpus
    return [f"out_dir={root}", "name=t", f"tokenizer={tok_dir}", f"data.path={data_dir}", TINY_MODEL,
            "data.seq_len=32", "data.batch_size=4", "progress=false", "peak_flops=1e11", "analysis_problems=0",
            "tensorboard=false", "threads=1", *extra]


def test_schedules():
    cosine = OptimizerConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, 100, cosine) == pytest.approx(0.1) and lr_at(9, 100, cosine) == pytest.approx(1.0)
    assert lr_at(55, 100, cosine) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(99, 100, cosine) == pytest.approx(0.1, abs=1e-3)
    wsd = OptimizerConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert [lr_at(s, 100, wsd) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_at(90, 100, wsd) == pytest.approx(0.55) and lr_at(100, 100, wsd) == pytest.approx(0.1)


def test_bias_update_sign_recentre_fp32_and_no_grad():
    model = random_model(tiny_config())
    load = ExpertLoad(model)
    for moe, counts in zip(load.moes, load.counts):
        moe.gate.e_score_correction_bias.zero_()
        counts.copy_(torch.tensor([10.0, 0, 5, 5, 5, 5, 5, 5]))
    update_expert_bias(load, 0.01)
    for moe in load.moes:
        bias = moe.gate.e_score_correction_bias
        assert bias.dtype == torch.float32 and not bias.requires_grad
        assert bias.sum().abs() < 1e-7  # re-centred
        # overloaded expert 0 pushed down, starved expert 1 pushed up, balanced ones equal
        assert bias[0] < bias[2] < bias[1] and torch.allclose(bias[2:], bias[2].expand(6))
        assert float(bias[1] - bias[0]) == pytest.approx(0.02)
    assert load.imbalance()[0] == pytest.approx(10 / 5)  # max / mean


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    model = random_model(tiny_config()).train()
    optimizer = build_optimizer(model, OptimizerConfig())
    model.compute_loss(torch.randint(0, 128, (2, 8)), torch.randint(0, 128, (2, 8)))["loss"].backward()
    optimizer.step()
    state = {"step": 1, "optimizer": optimizer.state_dict(), "rng": ckpt.rng_state(torch.device("cpu"))}
    ckpt.save_checkpoint(tmp_path / "step-1", model, {"k": 1}, None, state)
    assert not list(tmp_path.glob("*.partial"))
    loaded = ckpt.load_state(tmp_path / "step-1")
    again = build_optimizer(model, OptimizerConfig())
    again.load_state_dict(ckpt.optimizer_state(loaded["optimizer"]))
    for a, b in zip(optimizer.state_dict()["state"].values(), again.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loaded["rng"]["cpu"], torch.get_rng_state())
    # the folder is a model folder too
    restored = load(tmp_path / "step-1", device="cpu")
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), restored.state_dict().values()))


def test_partial_checkpoints_are_ignored_and_pruned(tmp_path):
    model = random_model(tiny_config())
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path / f"step-{step}", model, {}, None, {"step": step})
    (tmp_path / "step-8.partial").mkdir()  # a write killed half-way
    assert [s for s, _ in ckpt.checkpoints(tmp_path)] == [2, 4, 6]
    ckpt.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4", "step-6"]


def test_run_folder_layout_resume_and_refusals(tmp_path, corpus):
    overrides = tiny_overrides(tmp_path, corpus, "steps=6", "save_every=2", "keep_last=2")
    final = pretrain(load_train_config(None, overrides))
    stage = tmp_path / "t" / "pretrain"
    assert sorted(p.name for p in stage.iterdir() if p.is_dir()) == ["final", "step-2", "step-4"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "train_config.yaml"} <= {p.name for p in final.iterdir()}
    assert (stage / "loss.png").stat().st_size > 0 and (stage / "expert_load.png").stat().st_size > 0
    records = read_metrics(stage / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(6))
    assert {"loss", "ce", "mtp", "aux", "lr", "grad_norm", "tok_per_s", "mfu", "imbalance", "eta_s"} <= set(records[0])
    assert load(final, device="cpu").config.eos_token_id == Tokenizer.load(final).eos_id

    with pytest.raises(ValueError, match="already holds a run"):
        pretrain(load_train_config(None, overrides))
    assert pretrain(load_train_config(None, overrides), resume=True) == final  # finished: nothing to do
    # As after a kill during step 5: from step-4, steps 4 and 5 are recomputed bitwise.
    shutil.rmtree(final)
    (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:5]) + '{"step": 5, "lo')
    with pytest.raises(ValueError, match="config differs in optimizer.lr"):
        pretrain(load_train_config(None, overrides + ["optimizer.lr=1e-4"]), resume=True)
    pretrain(load_train_config(None, overrides), resume=True)
    assert [r["loss"] for r in read_metrics(stage / "metrics.jsonl")] == [r["loss"] for r in records]


def test_gradient_accumulation_matches_one_big_batch(tmp_path, corpus):
    def losses(name, *extra):
        overrides = tiny_overrides(tmp_path, corpus, f"name={name}", "steps=3", "save_every=0", "data.shuffle=false",
                                   "mtp_weight=0", "balance.aux_loss_alpha=0", *extra)
        pretrain(load_train_config(None, overrides))
        return [r["loss"] for r in read_metrics(tmp_path / name / "pretrain" / "metrics.jsonl")]

    big = losses("big", "data.batch_size=4")
    accumulated = losses("acc", "data.batch_size=2", "data.grad_accum=2")
    assert big == pytest.approx(accumulated, rel=1e-5)


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path, corpus):
    def losses(name, *extra):
        pretrain(load_train_config(None, tiny_overrides(tmp_path, corpus, f"name={name}", "steps=3", "save_every=0",
                                                         *extra)))
        return [r["loss"] for r in read_metrics(tmp_path / name / "pretrain" / "metrics.jsonl")]

    assert losses("recompute", "gradient_checkpointing=true") == pytest.approx(losses("plain"), rel=1e-6)


@pytest.mark.slow
def test_compiled_training_equals_eager(tmp_path, corpus):
    def losses(name, *extra):
        pretrain(load_train_config(None, tiny_overrides(tmp_path, corpus, f"name={name}", "steps=2", "save_every=0",
                                                         "mtp_weight=0",  # MTP sequences are 1 shorter: a recompile
                                                         *extra)))
        return [r["loss"] for r in read_metrics(tmp_path / name / "pretrain" / "metrics.jsonl")]

    assert losses("compiled", "compile=true") == pytest.approx(losses("eager"), rel=1e-4)


def test_flops_per_token_formula():
    config = tiny_config(num_nextn_predict_layers=0)
    model = random_model(config)
    counts = model.num_parameters()
    n_active = counts["active"] - counts["embedding"]
    expected = 6 * n_active + 3 * config.num_hidden_layers * 64 * config.num_attention_heads * (16 + 12)
    assert flops_per_token(model, 64) == expected


def test_nmi_and_segments(corpus):
    assert normalized_mutual_information(torch.tensor([[10.0, 0], [0, 10]])) == pytest.approx(1.0)
    assert normalized_mutual_information(torch.tensor([[5.0, 5], [5, 5]])) == pytest.approx(0.0, abs=1e-12)
    tokenizer = Tokenizer.load(corpus[0])
    task = get_task("arithmetic")
    problem = task.generate(3, 1)
    ids, segments = labelled_conversation(tokenizer, task, problem)
    assert ids == tokenizer.render_conversation(task.conversation(problem))[0]
    assert segments[0] == 0 and segments[-1] == 2 and sorted(set(segments)) == [0, 1, 2]
    assert segments == sorted(segments)  # prompt, then reasoning, then answer
