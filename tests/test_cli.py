import builtins
import inspect
import json
import os
import subprocess
import sys

import pytest

import nanoseek
from conftest import random_model, tiny_config
from nanoseek import cli
from nanoseek.infer import chat
from test_hub_tokenizer import write_tokenizer


def test_parser_matches_verb_table():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    assert set(sub.choices) == set(cli.VERBS)
    for name, fn in cli.VERBS.items():
        dests = {a.dest for a in sub.choices[name]._actions} - {"help"}
        assert dests == set(inspect.signature(fn).parameters), name
        assert inspect.getdoc(fn), f"verb {name} needs a docstring: it is its --help"


def test_help_lists_each_verb_with_its_whole_first_sentence():
    sub = next(a for a in cli.build_parser()._actions if a.dest == "verb")
    helps = {action.dest: action.help for action in sub._choices_actions}
    assert helps["demo"] == ("Build a randomly initialised tiny DeepSeek-V3 model, save it in the Hugging Face layout, "
                             "load it back, and greedily generate from it (a smoke test of the whole model path).")
    assert helps["pretrain"].endswith("steps=100 optimizer.lr=1e-3`.")  # "e.g." does not end a sentence
    assert helps["distill"] == ("Distil TEACHER (a model folder) into STUDENT: a model folder to start from, or a "
                                "JSON/YAML model config for a fresh, smaller MoE or dense model.")
    for name, fn in cli.VERBS.items():
        doc = " ".join(inspect.getdoc(fn).split())
        assert helps[name].endswith(".") and doc.startswith(helps[name]), name
        assert doc == helps[name] or doc[len(helps[name])] == " ", name
    assert cli.build_parser().description == "The `nanoseek` command."
    shown = " ".join(cli.build_parser().format_help().split())
    assert f"demo {helps['demo']} generate {helps['generate']}" in shown


def test_info_counts_parameters_and_cache(tmp_path, capsys):
    config = tiny_config(num_nextn_predict_layers=1)
    random_model(config).save_pretrained(tmp_path)
    report = cli.info(str(tmp_path))
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    assert report["parameters_active_per_token"] == (report["parameters_total"]
                                                     - moe_layers * per_expert * (config.n_routed_experts - 2))
    assert report["layers"] == {"dense": 1, "moe": 2, "mtp": 1}
    assert report["cache_bytes_per_token"] == (24 + 8) * 3 * 4
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report


def test_cli_errors_are_clear_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nanoseek.cli", "info", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"model directory {tmp_path / 'missing'} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_demo_saves_loads_and_generates(tmp_path):
    tokens = cli.demo(out_dir=str(tmp_path / "demo"), max_new_tokens=5)
    assert len(tokens) == 5 and (tmp_path / "demo" / "config.json").exists()


@pytest.fixture
def short_context(tmp_path):
    """A model folder whose context holds 16 tokens, with a character-level tokenizer (one token per
    character; EOS id 1, which this model does not emit in the replies below)."""
    random_model(tiny_config(max_position_embeddings=16), std=0.3).save_pretrained(tmp_path)
    write_tokenizer(tmp_path)
    return tmp_path


def test_generate_verb_stops_where_the_context_is_full(short_context, capsys):
    _, tokenizer = chat.load_engine(str(short_context))
    prompt = tokenizer.encode_document("abcdefghij")  # BOS + 10 characters: room for 5 tokens
    tokens = nanoseek.generate(nanoseek.load(short_context), [prompt], max_new_tokens=5, ignore_eos=True)[0]
    assert 1 not in tokens
    assert chat.generate(str(short_context), "abcdefghij", max_new_tokens=50) == tokenizer.decode(tokens)
    err = capsys.readouterr().err
    assert "\n[5 tokens, " in err and err.endswith("; stopped: the context of 16 tokens is full]\n")


def test_generate_verb_refuses_a_prompt_that_fills_the_context(short_context):
    proc = subprocess.run([sys.executable, "-m", "nanoseek.cli", "generate", str(short_context), "--prompt", "x" * 15],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert ("nanoseek: error: the prompt has 16 tokens, which leaves no room in the model's context of 16 tokens "
            "(max_position_embeddings)") in proc.stderr


def test_chat_refuses_a_message_too_long_and_stops_a_reply_at_the_context(short_context, capsys, monkeypatch):
    _, tokenizer = chat.load_engine(str(short_context))
    prompt = tokenizer.render_prompt([{"role": "user", "content": "hi"}])  # 5 tokens: room for 11
    tokens = nanoseek.generate(nanoseek.load(short_context), [prompt], max_new_tokens=11, ignore_eos=True)[0]
    assert 1 not in tokens
    lines = iter(["x" * 13, "hi", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda _: next(lines))
    chat.chat(str(short_context), max_new_tokens=50, temperature=0.0, compile=False)
    out = capsys.readouterr().out
    assert ("[message not sent: the prompt has 16 tokens, which leaves no room in the model's context of 16 "
            "tokens (max_position_embeddings)]") in out
    assert f"\n{tokenizer.decode(tokens)}\n[11 tokens, " in out
    assert "; stopped: the context of 16 tokens is full]" in out


def test_long_lived_verbs_compile_and_reuse_prefixes_by_default():
    parse = cli.build_parser().parse_args
    for verb in ("serve", "chat"):
        default = parse([verb, "model"])
        assert (default.compile, default.prefix_cache_mb) == (True, chat.PREFIX_CACHE_MB), verb
        off = parse([verb, "model", "--no-compile", "--prefix-cache-mb", "0"])
        assert (off.compile, off.prefix_cache_mb) == (False, 0), verb
    assert parse(["generate", "model"]).compile is False  # one prompt: a compile would not pay off


def test_negative_prefix_cache_is_refused_by_its_flag(monkeypatch):
    assert chat.prefix_cache_bytes(3) == 3 << 20
    monkeypatch.setattr(chat, "load_engine", lambda *a, **k: pytest.fail("the engine must not load"))
    for verb in (chat.chat, chat.serve):
        with pytest.raises(ValueError, match="--prefix-cache-mb must be >= 0"):
            verb("model", prefix_cache_mb=-1)


def test_compile_cache_folder_is_per_user_and_overridable(monkeypatch, tmp_path):
    for name in (chat.COMPILE_CACHE_ENV, "TORCHINDUCTOR_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert chat.use_compile_cache() == str(tmp_path / "xdg" / "nanoseek" / "compile")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "nanoseek" / "compile")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # set by the user: kept
    assert chat.use_compile_cache() == str(tmp_path / "inductor")
    monkeypatch.setenv(chat.COMPILE_CACHE_ENV, str(tmp_path / "mine"))
    assert chat.use_compile_cache() == os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
