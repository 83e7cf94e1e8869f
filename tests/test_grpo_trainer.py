"""The GRPO trainer around the pure math (test_grpo_math.py): prompts from the train split only and
a function of (seed, step); engine and trainer log-probs equal on the same tokens; an update that
moves the policy; dynamic sampling; exact resume."""

import shutil

import pytest
import torch

from conftest import random_model, tiny_config
from nanoseek.data import get_task, is_eval_problem
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.grpo import GRPOConfig, GRPOTrainer, draw_prompts, grpo, load_grpo_config, policy_loss
from nanoseek.train.metrics import read_metrics
from test_train import tiny_corpus


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    tok_dir, _ = tiny_corpus(root)
    model = random_model(tiny_config(vocab_size=Tokenizer.load(tok_dir).vocab_size), std=0.02)
    model.save_pretrained(root / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "model" / name).write_bytes((tok_dir / name).read_bytes())
    return root / "model"


def trainer(model_dir, **fields) -> GRPOTrainer:
    from nanoseek.model.checkpoint import load

    config = GRPOConfig(init=str(model_dir), tasks={"arithmetic": [2]}, prompts=3, group_size=4, max_new_tokens=12,
                        micro_batch=5, **fields)
    return GRPOTrainer(config, load(model_dir), Tokenizer.load(model_dir))


def test_prompts_are_train_split_and_a_function_of_seed_and_step():
    task = get_task("arithmetic")
    drawn = draw_prompts([task], seed=1, step=7, count=50)
    assert not any(is_eval_problem(p) for _, p in drawn)
    assert drawn == draw_prompts([task], seed=1, step=7, count=50)
    assert drawn[20:] == draw_prompts([task], seed=1, step=7, count=30, offset=20)  # refills continue the stream
    assert drawn != draw_prompts([task], seed=1, step=8, count=50)


def test_a_step_logs_every_metric_and_engine_logprobs_equal_the_trainers(model_dir, one_thread):
    t = trainer(model_dir)
    t.config.rewards = {"accuracy": 1.0, "length": 0.5}  # length varies across samples: non-zero advantages
    before = [p.detach().clone() for p in t.model.parameters()]
    record = t.step(0)
    for key in ("reward", "reward_std", "reward_accuracy", "reward_length", "accuracy", "format", "zero_std", "clip_low",
                "clip_high", "kl", "entropy", "completion_tokens", "truncation", "logprob_gap", "rollout_s",
                "update_s", "reference_s", "grad_norm", "samples"):
        assert key in record, key
    assert record["logprob_gap"] < 1e-4  # the engine sampled from the policy the trainer differentiates
    assert any(not torch.equal(a, p) for a, p in zip(before, t.model.parameters()))
    second = t.step(1)  # after an optimizer step the engine samples the new policy, not a stale copy
    assert second["logprob_gap"] < 1e-4


def test_dynamic_sampling_drops_groups_without_signal(model_dir, one_thread):
    # A random model never writes the strict format: every group is constant, so all are dropped.
    t = trainer(model_dir, dynamic_sampling=True, rewards={"format": 1.0})
    batch = t.rollout(0)
    assert batch.rollouts == [] and batch.zero_std_groups == batch.groups == 4 * 3
    record = t.step(0)
    assert record["zero_std"] == 1.0 and "grad_norm" not in record


def test_reference_model_and_several_iterations(model_dir, one_thread):
    from nanoseek.model.checkpoint import load

    t = trainer(model_dir, beta=0.1, iterations=2, rewards={"length": 1.0})
    t.reference = load(model_dir).eval()
    record = t.step(0)
    assert record["kl"] >= 0 and record["reference_s"] > 0 and record["logprob_gap"] < 1e-4


@pytest.mark.slow
def test_grpo_resumes_exactly(model_dir, tmp_path):
    overrides = [f"out_dir={tmp_path}", "name=r", f"init={model_dir}", "tasks={arithmetic: [2]}", "prompts=2",
                 "group_size=3", "max_new_tokens=8", "steps=4", "save_every=2", "progress=false", "threads=1",
                 "rewards={length: 1.0, tag_count: 0.5}"]
    final = grpo(load_grpo_config(None, overrides))
    records = read_metrics(tmp_path / "r" / "grpo" / "metrics.jsonl")
    assert len(records) == 4 and (tmp_path / "r" / "grpo" / "rl_curves.png").exists()
    shutil.rmtree(final)  # killed after step 2's checkpoint
    grpo(load_grpo_config(None, overrides), resume=True)
    again = read_metrics(tmp_path / "r" / "grpo" / "metrics.jsonl")
    for key in ("reward", "loss", "completion_tokens"):
        assert [r[key] for r in again] == [r[key] for r in records], key


def test_rows_without_advantage_are_skipped_without_changing_the_gradient(model_dir, one_thread):
    """update() runs only rows with a non-zero advantage; with beta = 0 the others add exactly zero,
    so the gradient equals the objective over every row (dapo: normalised by all active tokens)."""
    t = trainer(model_dir)
    batch = t.rollout(0)
    batch.advantages = torch.linspace(-1.0, 1.0, len(batch.rollouts))
    batch.advantages[: t.config.group_size] = 0.0  # one group without signal
    inputs, targets, mask, _ = t._tensors(batch, list(range(len(batch.rollouts))))
    logprobs, _ = t.token_logprobs(t.model, inputs, targets)
    loss, _ = policy_loss(logprobs, logprobs.detach(), batch.advantages, mask, loss_type="dapo")
    loss.backward()
    expected = [p.grad.clone() for p in t.params]
    t.model.zero_grad(set_to_none=True)
    t.optimizer.step = lambda: None  # keep the gradient for inspection
    t.optimizer.zero_grad = lambda set_to_none=True: None
    t.update(batch)
    for want, p in zip(expected, t.params):
        torch.testing.assert_close(p.grad if p.grad is not None else torch.zeros_like(p), want, rtol=1e-4, atol=1e-7)
