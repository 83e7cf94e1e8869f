"""Every shipped config parses against the code that uses it, and bad keys fail by name."""

from pathlib import Path

import pytest
import torch

from nanoseek.model import ModelConfig, Transformer
from nanoseek.pipeline import PipelineConfig, load_pipeline_config
from nanoseek.train import TrainConfigError, load_train_config
from nanoseek.train.pretrain import model_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
REPO = CONFIGS.parent


def test_every_config_file_is_covered():
    names = {p.name for p in CONFIGS.iterdir()}
    assert names == {"bench-60m.json", "bench-1b.json", "pipeline.yaml"} | {
        p.name for p in CONFIGS.glob("pretrain-*.yaml")}


def test_bench_60m_model_config():
    config = ModelConfig.from_file(CONFIGS / "bench-60m.json")
    assert (config.hidden_size, config.num_hidden_layers, config.n_routed_experts, config.num_experts_per_tok) == (
        512, 8, 16, 4)


def test_bench_1b_model_config():
    """About 1B parameters in DeepSeek-V3's layout (V3's head sizes, 8 expert groups of which 4 are kept,
    noaux_tc routing), for the GPU benchmarks."""
    config = ModelConfig.from_file(CONFIGS / "bench-1b.json")
    with torch.device("meta"):
        total = Transformer(config).num_parameters()["total"]
    assert 0.9e9 < total < 1.1e9
    assert (config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, config.kv_lora_rank) == (128, 64, 128, 512)
    assert (config.n_group, config.topk_group, config.topk_method) == (8, 4, "noaux_tc")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("pretrain-*.yaml")), ids=lambda p: p.name)
def test_pretrain_configs_parse_and_build_a_model_config(path, monkeypatch):
    monkeypatch.chdir(REPO)  # model paths inside are relative to the repository root
    config = load_train_config(str(path))
    assert config.steps > 0 and config.data.seq_len > 0
    model = model_config(config, vocab_size=512, special={})
    assert model.vocab_size >= 512


def test_pipeline_yaml_is_the_default_pipeline():
    assert load_pipeline_config(str(CONFIGS / "pipeline.yaml")) == PipelineConfig()


def test_typo_in_file_names_the_key_and_suggests(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 10\noptimizer:\n  lr: 1e-3\n  warmup_step: 5\n")
    with pytest.raises(TrainConfigError, match=r"'optimizer.warmup_step' .*did you mean 'warmup_steps'"):
        load_train_config(str(bad))


def test_typo_in_override_and_wrong_types_fail_by_name():
    with pytest.raises(TrainConfigError, match="unknown config key 'pretrain.stpes'"):
        load_pipeline_config(None, ["pretrain.stpes=3"])
    with pytest.raises(TrainConfigError, match="'data.batch_size' = 'eight'"):
        load_train_config(None, ["data.batch_size=eight"])
    with pytest.raises(TrainConfigError, match="'optimizer.schedule' = 'linear'"):
        load_train_config(None, ["optimizer.schedule=linear"])
    with pytest.raises(TrainConfigError, match="not of the form key=value"):
        load_train_config(None, ["steps"])


def test_overrides_update_sections_key_by_key():
    config = load_pipeline_config(None, ["pretrain.steps=7", "pretrain.optimizer.lr=1e-3", "tasks={arithmetic: [1]}"])
    default = PipelineConfig()
    assert config.pretrain.steps == 7 and config.pretrain.optimizer.lr == 1e-3
    assert config.pretrain.model == default.pretrain.model  # untouched keys keep the pipeline's defaults
    assert config.pretrain.optimizer.warmup_steps == default.pretrain.optimizer.warmup_steps
    assert config.tasks == {"arithmetic": [1]}  # a mapping value replaces, it does not merge
