"""The Hugging Face hub layout built by hand: per-expert keys, a sharded index, FP8 weights with
128x128 block scales on shapes that are not multiples of 128, MTP stored as layer num_hidden_layers.
Plus every way a checkpoint can be wrong, each with an error naming the tensor."""

import itertools
import json
import os
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from conftest import random_model, tiny_config
from nanoseek.model import checkpoint
from nanoseek.model.checkpoint import (DEFAULT_SHARD_BYTES, INDEX_FILE, CheckpointError, dequantize_fp8, hub_state_dict,
                                       quantize_fp8, transformers_gaps)
from test_model_hf import hf_load
from nanoseek.model.config import ConfigError, ModelConfig

# Kept unquantised on the hub (docs/facts.md §7): embeddings, head, norms, router, bias; and eh_proj.
NOT_FP8 = ("embed_tokens", "lm_head", "norm", "mlp.gate.", "shared_head", "eh_proj")


def hub_config():
    # hidden 160 and intermediate 200: every quantised matrix has partial 128-blocks.
    return tiny_config(hidden_size=160, intermediate_size=200, moe_intermediate_size=136, q_lora_rank=144,
                       num_nextn_predict_layers=1)


def write_hub_checkpoint(model, directory, fp8: bool, shards: int = 3):
    """Write `model` the way DeepSeek's hub repos are laid out, independently of save_pretrained."""
    directory.mkdir(parents=True)
    tensors = {}
    for key, tensor in hub_state_dict(model):
        if fp8 and tensor.dim() == 2 and not any(part in key for part in NOT_FP8):
            tensors[key], tensors[key + "_scale_inv"] = quantize_fp8(tensor)
        else:
            tensors[key] = tensor.clone()
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, str(directory / name))
        weight_map.update({k: name for k in part})
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    config = model.config.to_hf_dict()
    if fp8:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
    (directory / "config.json").write_text(json.dumps(config))
    return tensors


def test_dequantize_matches_blockwise_definition():
    w = torch.randn(200, 300)
    q, s = quantize_fp8(w)
    assert s.shape == (2, 3) and q.dtype == torch.float8_e4m3fn
    expected = torch.empty(200, 300)
    for bi in range(2):
        for bj in range(3):
            rows, cols = slice(128 * bi, 128 * (bi + 1)), slice(128 * bj, 128 * (bj + 1))
            expected[rows, cols] = q[rows, cols].float() * s[bi, bj]
    assert torch.equal(dequantize_fp8(q, s), expected)
    assert (dequantize_fp8(q, s) - w).abs().max() < 0.07 * w.abs().max()


def test_hub_layout_with_fp8_sharding_and_mtp_loads(tmp_path):
    model = random_model(hub_config())
    tensors = write_hub_checkpoint(model, tmp_path / "hub", fp8=True)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in tensors
    assert "model.layers.3.eh_proj.weight" in tensors and "model.layers.3.shared_head.norm.weight" in tensors
    assert tensors["model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (1, 2)
    assert tensors["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (2, 2)
    loaded = nanoseek.load(tmp_path / "hub")
    assert loaded.dtype == torch.float32 and len(loaded.mtp) == 1
    # The reference: the same checkpoint dequantised here, written unquantised, and loaded by
    # transformers (another loader and another forward), then by nanoseek's plain path.
    plain = {k: dequantize_fp8(t, tensors[k + "_scale_inv"]) if k + "_scale_inv" in tensors else t
             for k, t in tensors.items() if not k.endswith("_scale_inv")}
    (tmp_path / "plain").mkdir()
    save_file(plain, str(tmp_path / "plain" / "model.safetensors"))
    (tmp_path / "plain" / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    ids = torch.randint(0, 128, (2, 30))
    with torch.no_grad():
        ours = loaded(ids)
        assert (ours - hf_load(tmp_path / "plain")(ids).logits).abs().max().item() <= 1e-4
        assert torch.equal(ours, nanoseek.load(tmp_path / "plain")(ids))
        assert (ours - model(ids)).abs().max() > 1e-3  # FP8 rounding is visible: the check above is not vacuous
    expert = loaded.layers[1].mlp.experts
    q = tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    s = tensors["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"]
    assert torch.equal(expert.gate_up_proj[3, 136:], dequantize_fp8(q, s))
    # and each weight is the original up to e4m3 rounding (3 mantissa bits: <= 1/16 relative, plus subnormals)
    original = dict(model.named_parameters())
    for name, p in loaded.named_parameters():
        assert (p - original[name]).abs().max() <= original[name].abs().max() / 16 + 1e-3, name
    with torch.no_grad():
        assert torch.equal(loaded.layers[1].mlp.gate.e_score_correction_bias,
                           model.layers[1].mlp.gate.e_score_correction_bias)


def test_save_pretrained_shards_and_reloads_exactly(tmp_path):
    model = random_model(hub_config())
    model.save_pretrained(tmp_path / "out", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    shard_files = set(index["weight_map"].values())
    assert len(shard_files) > 2
    keys = set()
    for name in shard_files:
        keys |= set(load_file(tmp_path / "out" / name))
    assert keys == set(index["weight_map"])
    assert "model.layers.2.mlp.experts.0.gate_proj.weight" in keys
    assert "model.layers.3.embed_tokens.weight" in keys  # MTP duplicates of shared tensors, as on the hub
    back = nanoseek.load(tmp_path / "out")
    ids = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    for a, b in zip(back.state_dict().items(), model.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1])


def logits_of(model_or_dir):
    model = nanoseek.load(model_or_dir) if not isinstance(model_or_dir, torch.nn.Module) else model_or_dir
    with torch.no_grad():
        return model(torch.arange(20)[None] % 128)


# Tiny models hold 0.7 MB of fp32 weights: 300 kB shards make 3 files.
LAYOUTS = {"single": DEFAULT_SHARD_BYTES, "sharded": 300_000}


@pytest.mark.parametrize("before,after", [(b, a) for b in LAYOUTS for a in LAYOUTS])
def test_save_over_a_model_keeps_other_files_and_removes_only_stale_weights(tmp_path, before, after):
    out = tmp_path / "m"
    random_model(tiny_config(), seed=0).save_pretrained(out, LAYOUTS[before])
    (out / "tokenizer.json").write_text("{}")
    (out / "runs" / "a").mkdir(parents=True)
    (out / "runs" / "a" / "notes.txt").write_text("kept")
    (out / "other.safetensors").write_bytes(b"not ours")  # a .safetensors file no index names
    new = random_model(tiny_config(), seed=1)
    new.save_pretrained(out, LAYOUTS[after])
    assert torch.equal(logits_of(out), logits_of(new))
    assert (out / "tokenizer.json").read_text() == "{}" and (out / "runs" / "a" / "notes.txt").read_text() == "kept"
    assert (out / "other.safetensors").read_bytes() == b"not ours"
    weights = {"model.safetensors"} if after == "single" else \
        {INDEX_FILE, *json.loads((out / INDEX_FILE).read_text())["weight_map"].values()}
    assert len(weights) == (1 if after == "single" else 4)
    assert {p.name for p in out.iterdir()} == weights | {"config.json", "README.md", "tokenizer.json", "runs",
                                                          "other.safetensors"}


@pytest.mark.parametrize("before,after", [(b, a) for b in LAYOUTS for a in LAYOUTS])
def test_a_save_interrupted_at_any_file_operation_leaves_a_loadable_model(tmp_path, monkeypatch, before, after):
    """Fail the k-th file write, rename or delete of a save over a previous model, for every k: the
    folder then loads the previous model (failures before the switch) or the new one (after it),
    never a mix, and the next save cleans up."""
    out = tmp_path / "m"
    old, new = random_model(tiny_config(), seed=0), random_model(tiny_config(), seed=1)
    old_logits, new_logits = logits_of(old), logits_of(new)
    operations = {"save_file": checkpoint.save_file, "replace": os.replace, "remove": os.remove}
    outcomes = []
    for k in itertools.count():
        old.save_pretrained(out, LAYOUTS[before])
        calls = [0]

        def failing(real):
            def call(*args, **kwargs):
                calls[0] += 1
                if calls[0] == k + 1:
                    raise OSError("injected failure")
                return real(*args, **kwargs)
            return call

        with monkeypatch.context() as patch:
            patch.setattr(checkpoint, "save_file", failing(operations["save_file"]))
            patch.setattr(os, "replace", failing(operations["replace"]))
            patch.setattr(os, "remove", failing(operations["remove"]))
            try:
                new.save_pretrained(out, LAYOUTS[after])
                finished = True
            except OSError as error:
                assert str(error) == "injected failure"
                finished = False
        loaded = logits_of(out)
        outcomes.append("old" if torch.equal(loaded, old_logits) else "new" if torch.equal(loaded, new_logits)
                        else "mixed")
        if finished:
            break
    # Every failure before the switch leaves the previous model, every later one the new model.
    switch = outcomes.index("new")
    assert k > 3 and outcomes == ["old"] * switch + ["new"] * (len(outcomes) - switch) and switch > 1
    new.save_pretrained(out, LAYOUTS[after])
    assert not (out / checkpoint.STAGING_DIR).exists()
    assert torch.equal(logits_of(out), new_logits)


@pytest.mark.parametrize("entry", ["absolute", "parent"])
def test_index_naming_a_file_outside_the_folder_is_refused(tmp_path, entry):
    """A crafted index must not make the loader read a file outside the checkpoint folder, even a
    valid shard (as here), and saving over it must not delete that file."""
    model = random_model(tiny_config())
    model.save_pretrained(tmp_path / "m", max_shard_bytes=300_000)
    index = json.loads((tmp_path / "m" / INDEX_FILE).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "m" / first).rename(tmp_path / "outside.safetensors")
    name = str(tmp_path / "outside.safetensors") if entry == "absolute" else "../outside.safetensors"
    key = next(k for k, v in sorted(index["weight_map"].items()) if v == first)
    index["weight_map"] = {k: name if v == first else v for k, v in index["weight_map"].items()}
    (tmp_path / "m" / INDEX_FILE).write_text(json.dumps(index))
    message = f"{tmp_path / 'm' / INDEX_FILE}: entry '{key}' names '{name}', which is not a file in the checkpoint"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        nanoseek.load(tmp_path / "m")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "outside.safetensors").exists()


def test_mtp_declared_but_absent_loads_without_mtp(tmp_path):
    model = random_model(tiny_config(num_nextn_predict_layers=1))
    tensors = write_hub_checkpoint(model, tmp_path / "hub", fp8=False, shards=1)
    single = {k: v for k, v in tensors.items() if not k.startswith("model.layers.3.")}
    for f in (tmp_path / "hub").glob("*.safetensors"):
        f.unlink()
    (tmp_path / "hub" / INDEX_FILE).unlink()
    save_file(single, str(tmp_path / "hub" / "model.safetensors"))
    with pytest.warns(UserWarning, match="MTP"):
        loaded = nanoseek.load(tmp_path / "hub")
    assert len(loaded.mtp) == 0


@pytest.mark.parametrize("damage,message", [
    ("drop", "missing tensor model.layers.1.self_attn.kv_b_proj.weight"),
    ("extra", "unexpected tensor model.layers.1.self_attn.rotary.weight"),
    ("shape", r"model.layers.1.self_attn.o_proj.weight: checkpoint shape \(64, 47\) != model shape \(64, 48\)"),
])
def test_broken_checkpoints_name_the_tensor(tmp_path, damage, message):
    model = random_model(tiny_config())
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    if damage == "drop":
        del tensors["model.layers.1.self_attn.kv_b_proj.weight"]
    elif damage == "extra":
        tensors["model.layers.1.self_attn.rotary.weight"] = torch.zeros(2)
    else:
        tensors["model.layers.1.self_attn.o_proj.weight"] = torch.zeros(64, 47)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        nanoseek.load(tmp_path)


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        nanoseek.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        nanoseek.load(tmp_path / "empty")
    random_model(tiny_config()).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        nanoseek.load(tmp_path / "m")


def test_only_safetensors_are_read(tmp_path):
    """A pickle next to the config is never opened: loading fails on the missing safetensors."""
    random_model(tiny_config()).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError):
        nanoseek.load(tmp_path)


def test_save_warns_where_transformers_would_differ(tmp_path):
    config = tiny_config(scoring_func="softmax", topk_method="greedy", moe_layer_freq=2)
    assert len(transformers_gaps(config)) == 2
    with pytest.warns(UserWarning, match="transformers will NOT reproduce"):
        random_model(config).save_pretrained(tmp_path)
    readme = (tmp_path / "README.md").read_text()
    assert "WARNING" in readme and "moe_layer_freq=2" in readme and "hard-codes sigmoid" in readme
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        random_model(tiny_config()).save_pretrained(tmp_path / "clean")  # a plain V3 config warns nothing
    assert transformers_gaps(tiny_config(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy",
                                         norm_topk_prob=True)) != []


def test_default_dtype_is_fp32_on_cpu_and_explicit_dtype_is_honoured(tmp_path):
    model = random_model(tiny_config())
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert nanoseek.load(tmp_path).dtype == torch.float32
    half = nanoseek.load(tmp_path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert half.layers[1].mlp.gate.weight.dtype == torch.float32  # routing stays fp32


# ---- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,field", [
    (dict(topk_group=3, n_group=2), "topk_group"),
    (dict(n_routed_experts=10, n_group=4, topk_group=1), "n_group"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(topk_method="best"), "topk_method"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling"),
    (dict(moe_layer_freq=0), "moe_layer_freq"),
])
def test_inconsistent_config_names_the_field(change, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        tiny_config(**change)


def test_unknown_config_key_names_it(tmp_path):
    raw = tiny_config().to_hf_dict()
    raw["kv_lora_rnak"] = 3
    with pytest.raises(ConfigError, match="'kv_lora_rnak'.*did you mean 'kv_lora_rank'"):
        ModelConfig.from_hf_dict(raw)
    raw = tiny_config().to_hf_dict()
    raw["num_key_value_heads"] = 2
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        ModelConfig.from_hf_dict(raw)


def test_config_roundtrip_and_v2_defaults():
    config = tiny_config(q_lora_rank=None, rope_scaling={"type": "yarn", "factor": 4.0,
                                                         "original_max_position_embeddings": 64})
    raw = config.to_hf_dict()
    assert raw["q_lora_rank"] is None and raw["rope_scaling"]["mscale_all_dim"] == 1.0  # both mscale fields written
    assert ModelConfig.from_hf_dict(raw).to_hf_dict() == raw
    v2 = ModelConfig.from_hf_dict({k: v for k, v in raw.items()
                                   if k not in ("topk_method", "scoring_func", "norm_topk_prob")} | {
        "model_type": "deepseek_v2", "n_group": None, "topk_group": None})
    assert (v2.topk_method, v2.scoring_func, v2.norm_topk_prob) == ("greedy", "softmax", False)
