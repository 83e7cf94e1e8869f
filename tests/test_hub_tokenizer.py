"""A checkpoint's own tokenizer and chat template (as in a Hugging Face DeepSeek release) for chat,
generate and serve: rendered as transformers' apply_chat_template renders it, on a handmade
tokenizer.json + tokenizer_config.json with DeepSeek's special tokens and a multi-line template."""

import builtins
import json

import pytest
import transformers
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, processors

import nanoseek
from conftest import random_model, tiny_config
from nanoseek.hub_tokenizer import HubTokenizer
from nanoseek.infer import chat as chat_verbs
from nanoseek.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
CHARS = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"<>&:\n｜▁"

# DeepSeek-V3's template reduced to its parts, laid out on indented lines as many hub templates are:
# without trim_blocks and lstrip_blocks the tag-only lines would leave newlines and spaces behind.
TEMPLATE = """{% set ns = namespace(system_prompt='') %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% set ns.system_prompt = message['content'] %}
    {% endif %}
{% endfor %}
{{ bos_token }}{{ ns.system_prompt }}
{%- for message in messages %}
    {% if message['role'] == 'user' %}
        {{- '<｜User｜>' + message['content'] -}}
    {% elif message['role'] == 'assistant' %}
        {{- '<｜Assistant｜>' + message['content'] + eos_token -}}
    {% elif message['role'] == 'tool' %}
        {{- 'tool: ' + message['content'] | tojson -}}
    {% elif message['role'] != 'system' %}
        {{- raise_exception('Unknown role: ' + message['role']) -}}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<｜Assistant｜>' -}}
{% endif %}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 3?"}],
    [{"role": "user", "content": "look"}, {"role": "tool", "content": "<b>&'\u00fc\"</b>"},
     {"role": "assistant", "content": "ok"}],
]


def write_tokenizer(directory, chat_template: str | None = TEMPLATE) -> None:
    """Characters as tokens after DeepSeek's special tokens (ids 0 and 1, as in its config.json), and
    a post-processor that starts a plain text with BOS, as DeepSeek's tokenizer.json does."""
    specials = [BOS, EOS, USER, ASSISTANT, "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + list(CHARS))}
    backend = Backend(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(specials)
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    backend.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "bos_token": {"__type": "AddedToken", "content": BOS, "lstrip": False, "normalized": True,
                            "rstrip": False, "single_word": False},
              "eos_token": EOS, "unk_token": "<unk>", "model_max_length": 1024}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hub")
    random_model(tiny_config(), std=0.3).save_pretrained(directory)
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def hf_tok(hub_dir):
    return transformers.AutoTokenizer.from_pretrained(hub_dir)


def test_load_tokenizer_picks_the_checkpoints_own(hub_dir, tmp_path):
    tok = load_tokenizer(hub_dir)
    assert isinstance(tok, HubTokenizer) and (tok.bos_id, tok.eos_id) == (0, 1)
    with pytest.raises(ValueError, match="lacks special tokens"):
        Tokenizer.load(hub_dir)  # training still needs nanoseek's own
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        load_tokenizer(tmp_path)


def test_template_renders_as_written(hub_dir):
    tok = load_tokenizer(hub_dir)
    assert tok.render_text(CONVERSATIONS[1], add_generation_prompt=True) == (
        f"{BOS}Be brief.{USER}What is 2 + 2?{ASSISTANT}4.{EOS}{USER}And 3 + 3?{ASSISTANT}")
    assert tok.render_text(CONVERSATIONS[2], add_generation_prompt=False) == (
        f"{BOS}{USER}looktool: \"<b>&'\u00fc\\\"</b>\"{ASSISTANT}ok{EOS}")  # tojson without HTML escapes


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_rendering_matches_transformers_apply_chat_template(hub_dir, hf_tok, conversation):
    tok = load_tokenizer(hub_dir)
    for generation_prompt in (False, True):
        assert tok.render_text(conversation, generation_prompt) == hf_tok.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=generation_prompt)
    context = conversation[:-1] if conversation[-1]["role"] == "assistant" else conversation
    assert tok.render_prompt(conversation) == hf_tok.apply_chat_template(
        context, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert tok.encode_document("plain text") == hf_tok("plain text")["input_ids"]
    assert tok.decode(tok.render_prompt(conversation)) == hf_tok.decode(tok.render_prompt(conversation))


def test_nanoseeks_own_template_renders_as_its_tokenizer_does(tmp_path):
    """nanoseek's saved template (with transformers' {% generation %} block) through the generic path."""
    tok = train_tokenizer(["What is 12 + 30? The model adds numbers."] * 20, vocab_size=300)
    tok.save(tmp_path)
    hub = HubTokenizer.load(tmp_path)
    for conversation in CONVERSATIONS[:2]:
        assert hub.render_prompt(conversation) == tok.render_prompt(conversation)


def test_template_errors_are_value_errors_with_the_message(hub_dir, hf_tok):
    bad = [{"role": "narrator", "content": "x"}]
    with pytest.raises(ValueError, match="chat template of .*: Unknown role: narrator"):
        load_tokenizer(hub_dir).render_prompt(bad)
    with pytest.raises(Exception, match="Unknown role: narrator"):
        hf_tok.apply_chat_template(bad, tokenize=False)


def test_generate_and_chat_run_on_the_checkpoints_tokenizer(hub_dir, hf_tok, capsys, monkeypatch):
    model = nanoseek.load(hub_dir)
    prompt = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True,
                                        add_generation_prompt=True, return_dict=False)
    expected = nanoseek.generate(model, [prompt], max_new_tokens=6, eos_token_id=[1])[0]
    expected_text = hf_tok.decode(expected[:-1] if expected[-1] == 1 else expected)
    assert chat_verbs.generate(str(hub_dir), "hi", max_new_tokens=6, chat_template=True) == expected_text

    plain = nanoseek.generate(model, [hf_tok("hi")["input_ids"]], max_new_tokens=6)[0]
    plain_text = hf_tok.decode(plain[:-1] if plain[-1] == 1 else plain)
    assert chat_verbs.generate(str(hub_dir), "hi", max_new_tokens=6) == plain_text
    capsys.readouterr()

    lines = iter(["hi", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda _: next(lines))
    chat_verbs.chat(str(hub_dir), max_new_tokens=6, temperature=0.0, compile=False)
    assert f"\n{expected_text}\n[{len(expected)} tokens" in capsys.readouterr().out


def test_a_tokenizer_without_chat_template_serves_plain_prompts_and_says_so(hub_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((hub_dir / name).read_bytes())
    write_tokenizer(tmp_path, chat_template=None)
    tok = load_tokenizer(tmp_path)
    plain = nanoseek.generate(nanoseek.load(tmp_path), [[0] + tok.encode("hi")], 3)[0]
    expected = tok.decode(plain[:-1] if plain[-1] == 1 else plain)
    assert chat_verbs.generate(str(tmp_path), "hi", max_new_tokens=3) == expected
    with pytest.raises(ValueError, match="has no chat template .*use a plain prompt"):
        chat_verbs.generate(str(tmp_path), "hi", max_new_tokens=3, chat_template=True)
