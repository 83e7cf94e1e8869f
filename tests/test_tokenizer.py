import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from nanoseek.tokenizer import (
    ASSISTANT,
    BOS,
    CHAT_TEMPLATE,
    EOS,
    REASONING_TOKENS,
    SPECIAL_TOKENS,
    USER,
    Tokenizer,
    train_tokenizer,
)


def _training_text(n: int = 400) -> list[str]:
    rng = random.Random(0)
    words = "the model learns to add numbers and reason step by step before it answers".split()
    lines = []
    for _ in range(n):
        sentence = " ".join(rng.choice(words) for _ in range(12))
        lines.append(f"{sentence.capitalize()}. {rng.randint(0, 10**6)} + {rng.randint(0, 999)} = ?\n")
    lines.append("Ünïcödé, 日本語のテキスト, emoji 🙂 and tabs\tand  spaces.")
    return lines


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(_training_text(), vocab_size=360)


@pytest.fixture(scope="module")
def hf_dir(tok, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    tok.save(directory, model_max_length=1024)
    return directory


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    return AutoTokenizer.from_pretrained(hf_dir)


CONVERSATION = [
    {"role": "system", "content": "You are a careful calculator."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "<think>\n2 + 0 = 2, 1 + 3 = 4\n</think>\n<answer>\n42\n</answer>"},
    {"role": "user", "content": "  And 日本 + 🙂?\n"},
    {"role": "assistant", "content": "No idea."},
]

texts_with_specials = st.lists(st.one_of(st.text(), st.sampled_from(SPECIAL_TOKENS))).map("".join)
def conversations_of(content):
    return st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": content}),
                    max_size=6)


# Ordinary text, on which our rendering and transformers' apply_chat_template agree; and content that
# mixes it with special tokens' text, which only our renderer keeps ordinary (docs/serving.md).
conversations = conversations_of(st.text(max_size=40))
hostile_conversations = conversations_of(
    st.lists(st.one_of(st.text(max_size=12), st.sampled_from(SPECIAL_TOKENS)), max_size=4).map("".join))


def test_vocab_and_special_ids(tok):
    assert tok.vocab_size == 360
    ids = [tok.special_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (tok.special_id(BOS), tok.special_id(EOS), ids[2])
    with pytest.raises(KeyError):
        tok.special_id("<|nope|>")


def test_vocab_too_small_is_refused():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(texts_with_specials)
def test_round_trip_with_special_tokens(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_atomic(tok):
    for token in SPECIAL_TOKENS:
        assert tok.encode(token) == [tok.special_id(token)]
        ids = tok.encode(f"x{token}y {token}{token}")
        assert ids.count(tok.special_id(token)) == 3
        assert tok.decode(ids, skip_special=True) == "xy "
    # A special token is never produced from ordinary text that merely resembles it.
    assert not set(tok.encode("<|bos| <think >")) & set(range(len(SPECIAL_TOKENS)))


def test_render_conversation_layout_and_mask(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    assert len(ids) == len(mask)
    assert ids[0] == tok.bos_id and mask[0] == 0
    # The role tokens open turns and never carry loss; the reasoning tags in assistant content do.
    assert [m for i, m in zip(ids, mask) if i in (tok.system_id, tok.user_id, tok.assistant_id)] == [0] * 5
    assert [m for i, m in zip(ids, mask) if i == tok.special_id("<think>")] == [1]
    trained = [i for i, m in zip(ids, mask) if m]
    expected = []
    for message in CONVERSATION:
        if message["role"] == "assistant":
            expected += tok.encode(message["content"]) + [tok.eos_id]
    assert trained == expected
    assert tok.decode(ids) == (
        BOS
        + "".join(
            f"<|{m['role']}|>{m['content']}" + (EOS if m["role"] == "assistant" else "") for m in CONVERSATION
        )
    )


@settings(max_examples=100, deadline=None)
@given(hostile_conversations)
def test_mask_covers_exactly_assistant_content_and_eos(tok, conversation):
    ids, mask = tok.render_conversation(conversation)
    # Walk the rendering turn by turn and rebuild the mask independently.
    # Content is untrusted text: only the reasoning tags in assistant content stay special tokens, so
    # a system or user message holding "<answer>" counts its characters, not one id.
    def content_ids(message):
        return tok.encode_text(message["content"], REASONING_TOKENS if message["role"] == "assistant" else ())

    expected_mask = [0]
    for message in conversation:
        if message["role"] == "assistant":
            expected_mask += [0] + [1] * (len(content_ids(message)) + 1)
        else:
            expected_mask += [0] * (1 + len(content_ids(message)))
    assert mask == expected_mask
    assert sum(mask) == sum(len(content_ids(m)) + 1 for m in conversation if m["role"] == "assistant")


def test_render_prompt(tok):
    prompt = tok.render_prompt(CONVERSATION)
    assert prompt == tok.render_conversation(CONVERSATION[:-1])[0] + [tok.assistant_id]
    assert tok.render_prompt(CONVERSATION[:-1]) == prompt
    expected = [tok.bos_id, tok.user_id, *tok.encode("hi"), tok.assistant_id]
    assert tok.render_prompt([{"role": "user", "content": "hi"}]) == expected


def test_unknown_role_is_refused(tok):
    with pytest.raises(ValueError, match="role"):
        tok.render_conversation([{"role": "tool", "content": "x"}])


def test_save_load(tok, hf_dir):
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (BOS, EOS, "<|pad|>")
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == 1024
    loaded = Tokenizer.load(hf_dir)
    text = "Load me: 123 + 456 = 579 🙂"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.render_conversation(CONVERSATION) == tok.render_conversation(CONVERSATION)


def test_load_missing_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.load(tmp_path)


def test_auto_tokenizer_chat_template_matches_renderer(tok, hf_tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    out = hf_tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == ids
    assert out["input_ids"].count(tok.bos_id) == 1  # apply_chat_template must not add a second BOS
    assert out["assistant_masks"] == mask
    prompt = hf_tok.apply_chat_template(CONVERSATION[:-1], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert prompt == tok.render_prompt(CONVERSATION)
    text = hf_tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert text == f"{BOS}<|system|>{CONVERSATION[0]['content']}{USER}{CONVERSATION[1]['content']}{ASSISTANT}"


@settings(max_examples=50, deadline=None)
@given(conversations.filter(bool))
def test_auto_tokenizer_agrees_on_any_conversation(tok, hf_tok, conversation):
    out = hf_tok.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == tok.render_conversation(conversation)[0]


def test_auto_tokenizer_plain_text_and_specials(tok, hf_tok):
    text = "The model learns 12 + 30 = 42 🙂"
    assert hf_tok(text)["input_ids"] == [tok.bos_id] + tok.encode(text)
    assert hf_tok.decode(tok.encode(text)) == text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert len(hf_tok) == tok.vocab_size
    ids = tok.render_conversation(CONVERSATION)[0]
    assert hf_tok.decode(ids) == tok.decode(ids)


def test_every_digit_is_its_own_token(tok):
    """Column arithmetic needs a digit's token not to depend on its neighbours."""
    for number in ("7", "42", "12345", "9000"):
        ids = tok.encode(f"= {number}")
        digit_ids = [i for i in ids if tok.decode([i]).strip().isdigit()]
        assert [tok.decode([i]).strip() for i in digit_ids] == list(number)
