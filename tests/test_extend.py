"""Context extension: the config each method writes, its RoPE frequencies and softmax scale against
transformers' own rope functions, logits against transformers after a save, the passkey batches,
and a tiny `nanoseek extend` run that saves a loadable, resumable model."""

import shutil
import warnings

import pytest
import torch
import transformers
import yaml
from conftest import random_model, tiny_config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from nanoseek import cli
from nanoseek.data import get_task
from nanoseek.data.passkey import PasskeyLoader
from nanoseek.model.checkpoint import load
from nanoseek.model.config import ModelConfig
from nanoseek.model.rope import inverse_frequencies, ntk_rope_theta
from nanoseek.tokenizer import Tokenizer, train_tokenizer
from nanoseek.train.config import TrainConfigError
from nanoseek.train.extend import scaled_config
from nanoseek.train.state import TRAIN_CONFIG
from nanoseek.train.metrics import read_metrics

ORIGINAL = 32


def hf_config(config: ModelConfig) -> transformers.DeepseekV3Config:
    hf = config.to_hf_dict()
    return transformers.DeepseekV3Config(
        hidden_size=hf["hidden_size"], num_attention_heads=hf["num_attention_heads"],
        qk_rope_head_dim=hf["qk_rope_head_dim"], qk_nope_head_dim=hf["qk_nope_head_dim"],
        max_position_embeddings=hf["max_position_embeddings"], rope_theta=hf["rope_theta"],
        rope_scaling=hf["rope_scaling"])


def test_config_written_for_each_method():
    base = tiny_config(max_position_embeddings=ORIGINAL, rope_theta=10000.0)
    yarn, pi, ntk, none = (scaled_config(base, method, 4.0) for method in ("yarn", "pi", "ntk", "none"))
    assert {c.max_position_embeddings for c in (yarn, pi, ntk, none)} == {4 * ORIGINAL}
    assert yarn.to_hf_dict()["rope_scaling"] == {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    assert yarn.rope_theta == 10000.0
    assert pi.to_hf_dict()["rope_scaling"] == {"type": "linear", "factor": 4.0} and pi.yarn is None
    assert ntk.rope_scaling is None and ntk.rope_theta == pytest.approx(10000.0 * 4 ** (8 / 6))
    # The baseline changes nothing but the context: the same frequencies and softmax scale.
    assert none == base.replace(max_position_embeddings=4 * ORIGINAL)
    assert torch.equal(inverse_frequencies(none), inverse_frequencies(base)) and none.softmax_scale == base.softmax_scale
    # The written configs read back as themselves.
    for config in (yarn, pi, ntk, none):
        assert ModelConfig.from_hf_dict(config.to_hf_dict()).replace(extra={}) == config
    with pytest.raises(TrainConfigError, match="already has rope_scaling"):
        scaled_config(yarn, "pi", 2.0)


@pytest.mark.parametrize("factor, beta_slow", [(2.0, 1.0), (4.0, 1.0), (40.0, 1.0), (640.0, 2.0)])
def test_yarn_frequencies_and_scales_match_transformers(factor, beta_slow):
    config = scaled_config(tiny_config(max_position_embeddings=ORIGINAL, qk_rope_head_dim=16), "yarn", factor,
                           beta_slow=beta_slow)
    assert config.yarn["beta_slow"] == beta_slow
    hf = hf_config(config)
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, None)
    assert torch.allclose(inverse_frequencies(config), theirs, rtol=1e-6)
    assert config.rope_amplitude == pytest.approx(attention_factor) == 1.0
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    assert config.softmax_scale == pytest.approx(yarn_apply_mscale(hf.rope_parameters, config.qk_head_dim ** -0.5))
    assert config.softmax_scale > config.qk_head_dim ** -0.5  # the temperature is really applied


def test_pi_frequencies_match_transformers_linear():
    config = scaled_config(tiny_config(max_position_embeddings=ORIGINAL), "pi", 4.0)
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["linear"](hf_config(config), None)
    assert torch.allclose(inverse_frequencies(config), theirs, rtol=1e-6) and attention_factor == 1.0
    assert config.softmax_scale == config.qk_head_dim ** -0.5 and config.rope_amplitude == 1.0


def test_ntk_base_is_transformers_dynamic_ntk_at_the_matching_length():
    """transformers' dynamic NTK at length L uses the static NTK base of scale factor*L/max - (factor-1);
    here factor 2 at L = 4 x max, i.e. the static scale 7."""
    dynamic = transformers.DeepseekV3Config(hidden_size=64, num_attention_heads=4, qk_rope_head_dim=8,
                                            max_position_embeddings=ORIGINAL,
                                            rope_scaling={"type": "dynamic", "factor": 2.0})
    theirs, _ = ROPE_INIT_FUNCTIONS["dynamic"](dynamic, None, seq_len=4 * ORIGINAL)
    ours = inverse_frequencies(tiny_config(qk_rope_head_dim=8, rope_theta=ntk_rope_theta(10000.0, 7.0, 8)))
    assert torch.allclose(ours, theirs, rtol=1e-5)


@pytest.mark.parametrize("method", ["yarn", "pi", "ntk"])
def test_every_method_loads_in_transformers_with_the_same_logits(method, tmp_path):
    config = scaled_config(tiny_config(max_position_embeddings=ORIGINAL), method, 4.0)
    model = random_model(config)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (2, 3 * ORIGINAL), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    with torch.no_grad():  # and the scaling matters past the original context
        plain = random_model(tiny_config(max_position_embeddings=4 * ORIGINAL))(ids)
    assert (plain - ours).abs().max().item() > 1e-3


def fit_passkey_tokenizer(directory):
    """A tokenizer of passkey text, about 25 tokens per filler sentence, saved at `directory`."""
    task = get_task("passkey")
    train_tokenizer([f"{p.prompt} {p.answer}." for p in (task.generate(seed, 1) for seed in range(100))],
                    600).save(directory)
    return directory


@pytest.fixture(scope="module")
def passkey_tok(tmp_path_factory):
    return fit_passkey_tokenizer(tmp_path_factory.mktemp("tok"))


def test_passkey_batches_hold_one_document_at_varied_offsets_and_lengths(passkey_tok):
    tok = Tokenizer.load(passkey_tok)
    loader = PasskeyLoader(tok, batch_size=3, seq_len=200, seed=1)
    starts, repetitions = set(), set()
    for step in range(4):
        inputs, labels = loader.batch(step)
        assert inputs.shape == labels.shape == (3, 200)
        shifted = labels[:, 1:] != -100  # labels are the inputs one position on
        assert torch.equal(inputs[:, 1:][shifted], labels[:, :-1][shifted])
        for row in range(3):
            ids = inputs[row].tolist()
            start = ids.index(tok.bos_id)
            assert ids.count(tok.bos_id) == 1 and tok.decode(loader.filler).endswith(tok.decode(ids[:start]))
            real = labels[row][labels[row] != -100].tolist()
            assert real[-1] == tok.eos_id and len(real) <= 200
            document = tok.decode(real[start:])
            count = document.count("The grass is green.")
            assert 1 <= count <= loader.repetitions
            key = document.rsplit("The pass key is ", 1)[1].strip(". " + tok.decode([tok.eos_id]))
            assert f"The pass key is {key}. Remember it. {key} is the pass key." in document
            starts.add(start)
            repetitions.add(count)
    assert len(starts) > 3 and len(repetitions) > 1 and loader.repetitions > 1
    assert torch.equal(loader.batch(5)[0], loader.batch(5)[0]) and not torch.equal(loader.batch(6)[0], loader.batch(5)[0])


def test_passkey_min_fill_keeps_every_document_at_least_that_long(passkey_tok):
    tok = Tokenizer.load(passkey_tok)
    loader = PasskeyLoader(tok, batch_size=8, seq_len=200, seed=2, min_fill=0.75)
    assert loader.min_repetitions == round(0.75 * loader.repetitions) > 1
    for step in range(3):
        inputs, labels = loader.batch(step)
        for row in range(8):
            ids = inputs[row].tolist()
            document = tok.decode(ids[ids.index(tok.bos_id):])
            assert document.count("The grass is green.") >= loader.min_repetitions
    with pytest.raises(ValueError, match="min_fill"):
        PasskeyLoader(tok, batch_size=1, seq_len=200, min_fill=1.5)
    # A state saved without a floor resumes a loader without one, and is refused by one with a floor.
    uniform = PasskeyLoader(tok, batch_size=8, seq_len=200, seed=2)
    saved = {"step": 3, "seed": 2, "batch_size": 8, "seq_len": 200, "repetitions": uniform.repetitions}
    uniform.load_state_dict(saved)
    assert uniform.step == 3
    with pytest.raises(ValueError, match="min_repetitions differ"):
        loader.load_state_dict(saved)


def test_passkey_pose_positions_skip_once_within_the_target_length(passkey_tok):
    tok = Tokenizer.load(passkey_tok)
    plain = PasskeyLoader(tok, batch_size=8, seq_len=200, seed=3)
    loader = PasskeyLoader(tok, batch_size=8, seq_len=200, seed=3, pose_length=1000)
    skipped = 0
    for step in range(4):
        inputs, labels, positions = loader.batch(step)
        # The documents are those of the loader without PoSE: only their rope positions move.
        assert all(torch.equal(a, b) for a, b in zip((inputs, labels), plain.batch(step)))
        steps = positions.diff(dim=1)
        assert (positions[:, 0] == 0).all() and (positions[:, -1] <= 999).all()
        assert ((steps == 1).sum(dim=1) >= 198).all() and (steps >= 1).all()  # one jump at most per row
        skipped += int((positions[:, -1] > 199).sum())
    assert skipped > 16  # most rows do skip
    assert torch.equal(loader.batch(2)[2], loader.batch(2)[2]) and loader.settings()["pose_length"] == 1000
    assert "pose_length" not in plain.settings()  # states saved before PoSE existed still resume
    with pytest.raises(ValueError, match="pose_length"):
        PasskeyLoader(tok, batch_size=1, seq_len=200, pose_length=100)


def test_extend_verb_saves_a_loadable_longer_model_and_resumes(passkey_tok, tmp_path, capsys):
    base = tmp_path / "base"
    random_model(tiny_config(vocab_size=Tokenizer.load(passkey_tok).vocab_size,
                             max_position_embeddings=128)).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(passkey_tok / name, base / name)
    argv = ["extend", str(base), f"out_dir={tmp_path}", "name=x", "steps=4", "save_every=2", "data.batch_size=2",
            "progress=false", "tensorboard=false", "threads=1", "peak_flops=1e11", "analysis_problems=0",
            "--factor", "4", "--seq-len", "300"]
    cli.main(argv)
    final = tmp_path / "x" / "extend" / "final"
    model = load(final, device="cpu")
    assert model.config.max_position_embeddings == 512
    assert model.config.yarn["original_max_position_embeddings"] == 128 and model.config.yarn["factor"] == 4.0
    assert Tokenizer.load(final).vocab_size == Tokenizer.load(base).vocab_size
    records = read_metrics(tmp_path / "x" / "extend" / "metrics.jsonl")
    assert len(records) == 4 and all(r["tokens"] == 2 * 300 * (r["step"] + 1) for r in records)
    # Killed after step 2's checkpoint: the resumed run computes the same losses.
    shutil.rmtree(final)
    # ... also when its scaled start predates the recorded YaRN ramp (it had the default one).
    made_from = tmp_path / "x" / "extend" / "scaled" / TRAIN_CONFIG
    recorded = yaml.safe_load(made_from.read_text())
    made_from.write_text(yaml.safe_dump({k: v for k, v in recorded.items() if not k.startswith("beta_")}))
    cli.main([*argv, "--resume"])
    assert [r["loss"] for r in read_metrics(tmp_path / "x" / "extend" / "metrics.jsonl")] == [r["loss"] for r in records]
    assert load(final, device="cpu").config.max_position_embeddings == 512
    # The scaled starting point of this run is not silently replaced by another factor's.
    with pytest.raises(SystemExit):
        cli.main([*argv[:-4], "--factor", "2", "--seq-len", "200", "--resume"])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # nor by another YaRN ramp's
        cli.main([*argv[:2], "beta_slow=2", *argv[2:], "--resume"])
    assert "scaled from another model or scaling" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # and beta_slow must stay below beta_fast
        cli.main([*argv[:2], "beta_slow=40", *argv[2:]])
    assert "'beta_slow' = 40" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*argv[:-4], "name=z", "data.min_fill=1.5", *argv[-4:]])
    assert "'data.min_fill' = 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # PoSE positions must fit the extended context
        cli.main([*argv[:-4], "name=z", "data.pose_length=4096", *argv[-4:]])
    assert "'data.pose_length' = 4096" in capsys.readouterr().err


def test_extend_with_pose_and_logn(passkey_tok, tmp_path, capsys):
    """PoSE positions reach the loss (the run differs from one without them); `logn=true` writes
    log-n attention from the fine-tuning length on, and a resume with another setting is refused."""
    base = tmp_path / "base"
    random_model(tiny_config(vocab_size=Tokenizer.load(passkey_tok).vocab_size,
                             max_position_embeddings=128)).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(passkey_tok / name, base / name)
    argv = ["extend", str(base), f"out_dir={tmp_path}", "steps=2", "save_every=0", "data.batch_size=2",
            "progress=false", "tensorboard=false", "threads=1", "peak_flops=1e11", "analysis_problems=0"]
    flags = ["--factor", "4", "--seq-len", "200"]
    cli.main([*argv, "name=plain", *flags])
    with pytest.warns(UserWarning, match="transformers will NOT reproduce this model: logn_attention_length"):
        cli.main([*argv, "name=pose", "data.pose_length=512", "logn=true", *flags])
    losses = {name: [r["loss"] for r in read_metrics(tmp_path / name / "extend" / "metrics.jsonl")]
              for name in ("plain", "pose")}
    assert losses["plain"] != losses["pose"]
    assert load(tmp_path / "pose" / "extend" / "final", device="cpu").config.logn_attention_length == 200
    assert load(tmp_path / "plain" / "extend" / "final", device="cpu").config.logn_attention_length is None
    shutil.rmtree(tmp_path / "pose" / "extend" / "final")
    with pytest.raises(SystemExit):
        cli.main([*argv, "name=pose", "data.pose_length=512", *flags, "--resume"])
    assert "scaled from another model or scaling" in capsys.readouterr().err


def test_pretrain_on_passkey_documents(passkey_tok, tmp_path, capsys):
    """`data.source=passkey` pretrains on generated passkey documents: no shards on disk."""
    model = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, q_lora_rank: null, " \
            "kv_lora_rank: 16, qk_nope_head_dim: 8, qk_rope_head_dim: 8, v_head_dim: 8, n_routed_experts: null, " \
            "n_shared_experts: null, num_experts_per_tok: null, first_k_dense_replace: 0, max_position_embeddings: 256}"
    argv = ["pretrain", f"tokenizer={passkey_tok}", f"model={model}", "data.source=passkey", "data.seq_len=200",
            "data.batch_size=2", f"out_dir={tmp_path}", "name=p", "steps=3", "save_every=0", "progress=false",
            "tensorboard=false", "threads=1", "peak_flops=1e11", "analysis_problems=0", "mtp_weight=0"]
    cli.main(argv)
    records = read_metrics(tmp_path / "p" / "pretrain" / "metrics.jsonl")
    assert [r["tokens"] for r in records] == [400, 800, 1200]
    assert load(tmp_path / "p" / "pretrain" / "final", device="cpu").config.max_position_embeddings == 256
    with pytest.raises(SystemExit):  # documents longer than the model's context are refused
        cli.main([*argv, "name=q", "data.seq_len=300"])
    assert "beyond the model's context 256" in capsys.readouterr().err
