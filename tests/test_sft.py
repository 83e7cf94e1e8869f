"""SFT: loss on assistant tokens only, one conversation per row (no attention across two), small
padding, resumable batches; the conversation file's errors; the MTP loss under masked labels; the
optimizer never leaves the engine's packed weights stale."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import random_model, tiny_config
from nanoseek.data import get_task
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model.checkpoint import load
from nanoseek.tokenizer import Tokenizer, train_tokenizer
from nanoseek.train.metrics import read_metrics
from nanoseek.train.optim import OptimizerConfig, build_optimizer
from nanoseek.train.sft import (ConversationLoader, load_sft_config, read_conversations, sft, task_conversations,
                                tokenize, write_conversations)
from test_train import tiny_corpus


@pytest.fixture(scope="module")
def tok():
    task = get_task("arithmetic")
    conversations = task_conversations([task], 30, seed=0)
    texts = [m["content"] for c in conversations for m in c]
    return train_tokenizer(texts, 300)


def test_labels_cover_assistant_tokens_and_eos_only(tok):
    conversation = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}]
    (ids, labels), = tokenize(tok, [conversation], max_len=64)
    full, mask = tok.render_conversation(conversation)
    assert ids == full[:-1]
    learned = [t for t in labels if t != -100]
    assert learned == tok.encode("42") + [tok.eos_id]
    assert learned == [t for t, m in zip(full, mask) if m]


def test_batches_hold_whole_conversations_with_little_padding(tok):
    arithmetic = get_task("arithmetic")
    conversations = task_conversations([arithmetic], 80, seed=1)
    examples = tokenize(tok, conversations, max_len=512)
    loader = ConversationLoader(examples, batch_size=8, pad_id=tok.pad_id, seed=3)
    by_ids = {tuple(ids): labels for ids, labels in examples}
    real = padded = 0
    for step in range(2 * loader.batches_per_epoch):
        inputs, labels = loader.batch(step)
        for row, row_labels in zip(inputs.tolist(), labels.tolist()):
            length = next((i for i in range(len(row), 0, -1) if row[i - 1] != tok.pad_id), 0)
            # each row is exactly one conversation (starting at its BOS), then padding with no loss
            assert tuple(row[:length]) in by_ids and row[0] == tok.bos_id and row.count(tok.bos_id) == 1
            assert row_labels[:length] == by_ids[tuple(row[:length])] and set(row_labels[length:]) <= {-100}
            real, padded = real + length, padded + len(row) - length
    assert padded / (real + padded) < 0.1  # length-sorted windows
    # the batch of a step is a function of (seed, step): a resumed loader repeats it
    resumed = ConversationLoader(examples, batch_size=8, pad_id=tok.pad_id, seed=3)
    resumed.load_state_dict({**loader.state_dict(), "step": 5})
    assert all(torch.equal(a, b) for a, b in zip(next(resumed), loader.batch(5)))
    with pytest.raises(ValueError, match="seed"):
        ConversationLoader(examples, 8, tok.pad_id, seed=4).load_state_dict(loader.state_dict())


def test_conversation_file_errors_name_the_path_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        read_conversations(tmp_path / "nowhere.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                   + "\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*role"):
        read_conversations(bad)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: no assistant turn"):
        read_conversations(bad)
    good = tmp_path / "good.jsonl"
    conversations = task_conversations([get_task("arithmetic")], 3, seed=0)
    assert write_conversations(good, conversations) == len(conversations)
    assert read_conversations(good) == conversations


def test_mtp_inputs_come_from_the_input_ids_not_the_masked_labels(one_thread):
    model = random_model(tiny_config(num_nextn_predict_layers=1))
    ids = torch.randint(1, 128, (2, 12))
    labels = torch.cat((ids[:, 1:], torch.full((2, 1), -100)), dim=1)
    labels[:, :5] = -100  # an SFT prompt: no loss there, but its tokens are still the MTP inputs
    out = model.compute_loss(ids, labels, mtp_weight=1.0)
    hidden = model.hidden_states(ids)
    h = model.mtp_hidden(0, hidden[:, :-1], ids[:, 1:])
    logits = model.lm_head(model.mtp[0].norm(h))
    expected = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert torch.allclose(out["mtp"], expected, atol=1e-6)


def test_optimizer_steps_refresh_the_engines_packed_weights(one_thread):
    """Fused AdamW does not bump version counters by itself; the packed decode weights would then
    keep the pre-step weights, and an RL rollout would sample a stale policy."""
    model = random_model(tiny_config())
    engine = Engine(model, eos_token_ids=[])
    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=0, logprobs=True)
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-2))
    engine.generate([[1, 2, 3]], params)  # packs the weights
    model.train()
    model(torch.tensor([[1, 2, 3, 4]])).square().mean().backward()
    optimizer.step()
    model.eval()
    completion = engine.generate([[1, 2, 3]], params)[0][0]
    sequence = torch.tensor([[1, 2, 3] + completion.tokens])
    with torch.no_grad():
        logprobs = model(sequence)[0, 2:-1].log_softmax(-1).gather(-1, sequence[0, 3:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(completion.logprobs), logprobs, atol=1e-4)


@pytest.mark.slow
def test_sft_trains_on_conversations_and_resumes(tmp_path):
    tok_dir, data_dir = tiny_corpus(tmp_path)
    base = tmp_path / "base"
    model = random_model(tiny_config(vocab_size=Tokenizer.load(tok_dir).vocab_size))
    model.save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / name).write_bytes((tok_dir / name).read_bytes())
    task = get_task("arithmetic")
    conversations = task_conversations([task], 40, seed=0)
    write_conversations(tmp_path / "sft.jsonl", conversations)
    overrides = [f"out_dir={tmp_path}", "name=s", f"init={base}", f"data.path={tmp_path / 'sft.jsonl'}",
                 "data.batch_size=4", "steps=6", "save_every=3", "progress=false", "tensorboard=false", "threads=1",
                 "peak_flops=1e11", "analysis_problems=0", "eval_every=3", "eval_tasks={arithmetic: [2]}",
                 "eval_problems=2", "eval_max_new_tokens=8"]
    final = sft(load_sft_config(None, overrides))
    records = read_metrics(tmp_path / "s" / "sft" / "metrics.jsonl")
    assert len(records) == 6 and records[-1]["loss"] < records[0]["loss"]
    assert {"eval_loss", "eval_pass@1", "eval_format"} <= set(records[2]) and "eval_loss" not in records[1]
    assert load(final).config.vocab_size == model.config.vocab_size
    # killed after step 3's checkpoint: the resumed run computes the same losses
    shutil.rmtree(final)
    sft(load_sft_config(None, overrides), resume=True)
    again = read_metrics(tmp_path / "s" / "sft" / "metrics.jsonl")
    assert [r["loss"] for r in again] == [r["loss"] for r in records]
