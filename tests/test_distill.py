"""Distillation: jsd_loss against hand-computed divergences (both KLs, the mixture, temperature),
its mask and gradient; the vocabulary check; the student's on-policy batches; end-to-end runs of
both modes (logit off- and on-policy with exact resume, sequence through the CLI), each ending in a
model folder that loads; the teacher's samples drawn when no data file is given."""

import json
import math
import shutil

import pytest
import torch
import yaml

from conftest import random_model, tiny_config
from nanoseek import cli
from nanoseek.data import get_task
from nanoseek.model.checkpoint import load
from nanoseek.tokenizer import Tokenizer, train_tokenizer
from nanoseek.train.config import TrainConfigError
from nanoseek.train.distill import LogitDistillation, check_vocabularies, distill, jsd_loss, load_distill_config
from nanoseek.train.metrics import read_metrics
from nanoseek.train.sft import ConversationLoader, task_conversations, tokenize, write_conversations

TEACHER_PROBS = [0.7, 0.2, 0.1]
STUDENT_PROBS = [0.2, 0.3, 0.5]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def softmax(logits: list[float], temperature: float) -> list[float]:
    exps = [math.exp(z / temperature) for z in logits]
    return [e / sum(exps) for e in exps]


def expected_jsd(teacher: list[float], student: list[float], beta: float) -> float:
    if beta == 0:
        return kl(teacher, student)
    if beta == 1:
        return kl(student, teacher)
    mixture = [beta * t + (1 - beta) * s for t, s in zip(teacher, student)]
    return beta * kl(teacher, mixture) + (1 - beta) * kl(student, mixture)


def as_logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().view(1, 1, -1)


def test_jsd_loss_by_hand():
    # Symmetric pair, both KLs worked out by hand: 0.5 ln 2 - 0.25 ln 2.
    assert float(jsd_loss(as_logits([0.25, 0.5, 0.25]), as_logits([0.5, 0.25, 0.25]), torch.ones(1, 1),
                          beta=0)) == pytest.approx(0.25 * math.log(2))
    # Forward and reverse KL of an asymmetric pair differ; the loss picks the documented one.
    student, teacher, mask = as_logits(STUDENT_PROBS), as_logits(TEACHER_PROBS), torch.ones(1, 1)
    assert kl(TEACHER_PROBS, STUDENT_PROBS) == pytest.approx(0.7 * math.log(3.5) + 0.2 * math.log(2 / 3)
                                                             + 0.1 * math.log(0.2))
    for beta in (0.0, 0.5, 1.0, 0.1, 0.9):
        got = float(jsd_loss(student, teacher, mask, beta=beta))
        assert got == pytest.approx(expected_jsd(TEACHER_PROBS, STUDENT_PROBS, beta), rel=1e-9), beta
    assert float(jsd_loss(student, teacher, mask, beta=0)) != pytest.approx(float(jsd_loss(student, teacher, mask,
                                                                                            beta=1)))
    # beta = 0.5 is the Jensen-Shannon divergence: symmetric, at most ln 2.
    assert float(jsd_loss(teacher, student, mask)) == pytest.approx(float(jsd_loss(student, teacher, mask)))


def test_jsd_loss_scales_both_distributions_by_the_temperature():
    student_logits, teacher_logits = [1.0, -2.0, 0.5, 3.0], [2.0, 0.0, -1.0, 1.5]
    student = torch.tensor(student_logits).view(1, 1, -1)
    teacher = torch.tensor(teacher_logits).view(1, 1, -1)
    for temperature in (0.5, 2.0):
        s, t = softmax(student_logits, temperature), softmax(teacher_logits, temperature)
        for beta in (0.0, 0.5, 1.0):
            got = float(jsd_loss(student, teacher, torch.ones(1, 1), beta=beta, temperature=temperature))
            assert got == pytest.approx(expected_jsd(t, s, beta), rel=1e-5), (temperature, beta)
    assert float(jsd_loss(student, teacher, torch.ones(1, 1), temperature=2.0)) != pytest.approx(
        float(jsd_loss(student, teacher, torch.ones(1, 1))))


def test_jsd_loss_is_zero_for_identical_distributions():
    logits = torch.randn(2, 5, 11)
    shifted = logits + 3.0  # softmax is shift-invariant: the same distribution
    for beta in (0.0, 0.3, 0.5, 1.0):
        for temperature in (0.7, 1.0):
            assert float(jsd_loss(logits, shifted, torch.ones(2, 5), beta, temperature)) == pytest.approx(0, abs=1e-6)


def test_jsd_loss_averages_over_masked_tokens_only():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 7, requires_grad=True), torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]])
    with torch.no_grad():  # masked positions hold garbage, as padding may after EOS
        student[0, 3] = torch.inf
        teacher[1, 3] = -torch.inf
    loss = jsd_loss(student, teacher, mask, beta=0.3)
    per_token = [jsd_loss(student[b, t].view(1, 1, -1), teacher[b, t].view(1, 1, -1), torch.ones(1, 1), beta=0.3)
                 for b, t in ((0, 0), (0, 1), (1, 1), (1, 2))]
    assert float(loss.detach()) == pytest.approx(float(sum(per_token).detach()) / 4)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert (student.grad[mask == 0] == 0).all() and (student.grad[mask == 1] != 0).any()
    empty = jsd_loss(student.detach(), teacher, torch.zeros(2, 4))
    assert float(empty) == 0.0


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_jsd_loss_gradient_matches_finite_differences(beta):
    torch.manual_seed(1)
    student = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    assert torch.autograd.gradcheck(lambda s: jsd_loss(s, teacher, mask, beta=beta, temperature=1.5), (student,))
    jsd_loss(student, teacher, mask, beta=beta).backward()
    assert teacher.grad is None  # the teacher is a fixed target


def test_jsd_loss_errors():
    with pytest.raises(ValueError, match="one vocabulary.*8 vs 9"):
        jsd_loss(torch.zeros(1, 2, 8), torch.zeros(1, 2, 9), torch.ones(1, 2))
    with pytest.raises(ValueError, match="beta"):
        jsd_loss(torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), torch.ones(1, 2), beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        jsd_loss(torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), torch.ones(1, 2), temperature=0)


# ---- tiny models, tokenizer and data ----------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenizer, a teacher folder (tiny MoE with that tokenizer), a smaller student config file
    and a conversation file."""
    root = tmp_path_factory.mktemp("distill")
    conversations = task_conversations([get_task("arithmetic")], 12, seed=0)
    tok = train_tokenizer([m["content"] for c in conversations for m in c], 300)
    teacher = root / "teacher"
    random_model(tiny_config(vocab_size=tok.vocab_size), std=0.3).save_pretrained(teacher)
    tok.save(teacher)
    student = root / "student.json"
    student.write_text(json.dumps({"hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
                                   "num_hidden_layers": 2, "num_attention_heads": 2, "q_lora_rank": 16,
                                   "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
                                   "v_head_dim": 8, "n_routed_experts": 4, "num_experts_per_tok": 2,
                                   "first_k_dense_replace": 1, "max_position_embeddings": 512}))
    data = root / "convs.jsonl"
    write_conversations(data, conversations[:4])
    return {"root": root, "tok": tok, "teacher": teacher, "student": student, "data": data}


def run_overrides(setup, tmp_path, *extra: str) -> list[str]:
    return [f"out_dir={tmp_path}", "name=d", f"data.path={setup['data']}", "data.batch_size=4", "data.seq_len=96",
            "progress=false", "tensorboard=false", "threads=1", "peak_flops=1e11", "analysis_problems=0",
            "optimizer.warmup_steps=0", "optimizer.lr=1e-2", *extra]


def test_vocabulary_mismatch_is_refused_naming_both(setup, tmp_path):
    with pytest.raises(TrainConfigError, match=r"teacher .* vocab_size 300 .* student has vocab_size 301"):
        check_vocabularies(str(setup["teacher"]), 300, str(setup["teacher"]), 301)
    other = tmp_path / "other_tok"
    train_tokenizer(["completely different words", "nothing in common"] * 20, setup["tok"].vocab_size).save(other)
    with pytest.raises(TrainConfigError, match="map tokens to different ids"):
        check_vocabularies(str(setup["teacher"]), setup["tok"].vocab_size, str(other), setup["tok"].vocab_size)
    # end to end: a student whose vocabulary differs from the teacher's
    config = load_distill_config(None, run_overrides(setup, tmp_path, "mode=logit", "steps=1"),
                                 teacher=str(setup["teacher"]), student=str(setup["student"]))
    config.model = {**json.loads(setup["student"].read_text()), "vocab_size": setup["tok"].vocab_size + 16}
    with pytest.raises(TrainConfigError, match=f"vocab_size {setup['tok'].vocab_size} .* vocab_size "
                                               f"{setup['tok'].vocab_size + 16}.*mode=sequence"):
        distill(config)


def test_config_errors_name_the_key(setup):
    with pytest.raises(TrainConfigError, match="unknown config key 'lmbdaa'.*'lmbda'"):
        load_distill_config(None, ["lmbdaa=0.5"])
    with pytest.raises(TrainConfigError, match="unknown config key 'sampling.problem'"):
        load_distill_config(None, ["sampling.problem=3"])
    with pytest.raises(TrainConfigError, match="'beta' = 2"):
        load_distill_config(None, ["beta=2"])
    with pytest.raises(TrainConfigError, match="mtp_weight"):
        load_distill_config(None, ["mode=logit", "mtp_weight=0.3"])
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        load_distill_config(None, [], teacher="t", student=str(setup["root"] / "missing.json"))
    config = load_distill_config(None, ["mode=logit"], teacher=str(setup["teacher"]), student=str(setup["teacher"]))
    assert config.init == str(setup["teacher"]) and config.teacher == str(setup["teacher"])


def test_student_samples_replace_completions_after_the_prompt(setup, one_thread):
    tok = setup["tok"]
    model = random_model(tiny_config(vocab_size=tok.vocab_size))
    config = load_distill_config(None, ["mode=logit", "max_new_tokens=6", "temperature=1.0"])
    distiller = LogitDistillation(config, model, tok)
    conversations = task_conversations([get_task("arithmetic")], 1, seed=2)[:3]
    inputs, labels = ConversationLoader(tokenize(tok, conversations, 96), 3, tok.pad_id).batch(0)
    model.train()
    torch.manual_seed(5)
    sampled_inputs, sampled_labels = distiller.student_samples(model, inputs, labels)
    assert model.training
    prompts = [tok.render_prompt(c) for c in conversations]
    for row in range(len(conversations)):
        ids = sampled_inputs[row].tolist()
        # each row keeps its conversation's prompt (up to <|assistant|>), with no loss on it
        prompt = next(p for p in prompts if ids[:len(p)] == p)
        assert (sampled_labels[row, :len(prompt) - 1] == -100).all()
        # then the labels are the sampled tokens that follow it, ending in EOS unless cut at max_new_tokens
        completion = [t for t in sampled_labels[row].tolist() if t != -100]
        assert 1 <= len(completion) <= 6 and completion[:-1] == ids[len(prompt):len(prompt) + len(completion) - 1]
        assert len(completion) == 6 or completion[-1] == tok.eos_id
    torch.manual_seed(5)  # sample seeds come from the global RNG, which checkpoints restore
    again = distiller.student_samples(model, inputs, labels)
    assert torch.equal(again[0], sampled_inputs) and torch.equal(again[1], sampled_labels)


@pytest.mark.slow
def test_logit_distillation_trains_a_smaller_student(setup, tmp_path):
    config = load_distill_config(None, run_overrides(setup, tmp_path, "mode=logit", "steps=20", "save_every=0",
                                                     "beta=0.5", "optimizer.lr=3e-2", "optimizer.min_lr_ratio=1"),
                                 teacher=str(setup["teacher"]), student=str(setup["student"]))
    final = distill(config)
    records = read_metrics(tmp_path / "d" / "distill" / "metrics.jsonl")
    assert len(records) == 20 and all(math.isfinite(r["loss"]) and r["on_policy"] == 0 for r in records)
    assert records[-1]["divergence"] < 0.85 * records[0]["divergence"]  # one fixed batch, moving towards the teacher
    student = load(final)
    assert student.config.hidden_size == 32 and student.config.vocab_size == setup["tok"].vocab_size
    assert Tokenizer.load(final).vocab_size == setup["tok"].vocab_size
    assert yaml.safe_load((final / "train_config.yaml").read_text())["teacher"] == str(setup["teacher"])


@pytest.mark.slow
def test_on_policy_distillation_samples_from_the_student_and_resumes_exactly(setup, tmp_path):
    overrides = run_overrides(setup, tmp_path, "mode=logit", "lmbda=1", "max_new_tokens=8", "steps=4",
                              "save_every=2", "beta=0")
    final = distill(load_distill_config(None, overrides, str(setup["teacher"]), str(setup["student"])))
    records = read_metrics(tmp_path / "d" / "distill" / "metrics.jsonl")
    assert [r["on_policy"] for r in records] == [1.0] * 4 and all(math.isfinite(r["loss"]) for r in records)
    load(final)
    # killed after step 2's checkpoint: the resumed run draws the same samples, so the same losses
    shutil.rmtree(final)
    distill(load_distill_config(None, overrides, str(setup["teacher"]), str(setup["student"])), resume=True)
    again = read_metrics(tmp_path / "d" / "distill" / "metrics.jsonl")
    assert [r["loss"] for r in again] == [r["loss"] for r in records]


@pytest.mark.slow
def test_sequence_distillation_through_the_cli_with_a_yaml_dense_student(setup, tmp_path):
    dense = tmp_path / "dense.yaml"
    dense.write_text(yaml.safe_dump({"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                                     "num_attention_heads": 2, "q_lora_rank": 16, "kv_lora_rank": 16,
                                     "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
                                     "n_routed_experts": None, "max_position_embeddings": 512}))
    final = cli.distill(str(setup["teacher"]), str(dense), run_overrides(setup, tmp_path, "steps=3"))
    records = read_metrics(tmp_path / "d" / "distill" / "metrics.jsonl")
    assert len(records) == 3 and "ce" in records[0] and all(math.isfinite(r["loss"]) for r in records)
    student = load(final)
    assert not student.config.has_moe and student.config.num_hidden_layers == 2
    assert Tokenizer.load(final).vocab_size == setup["tok"].vocab_size


@pytest.mark.slow
def test_without_a_data_file_the_teacher_samples_first(setup, tmp_path):
    overrides = [f"out_dir={tmp_path}", "name=d", "steps=1", "sampling.tasks={arithmetic: [1]}",
                 "sampling.problems=2", "sampling.samples=2", "sampling.max_new_tokens=8"]
    config = load_distill_config(None, overrides, str(setup["teacher"]), str(setup["student"]))
    # A random teacher gets nothing right, so no sample survives and there is nothing to learn from.
    with pytest.raises(ValueError, match="no conversations"):
        distill(config)
    samples = tmp_path / "d" / "distill" / "teacher_samples"
    assert config.data.path == str(samples / "samples.jsonl")
    stats = json.loads((samples / "stats.json").read_text())
    assert stats["prompts"] >= 1 and stats["samples"] == 2 * stats["prompts"] and stats["accepted"] == 0
