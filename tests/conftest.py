import os

# Spinning OpenMP threads stall each other whenever another process holds a core (a shared dev box,
# a CI runner next to other jobs): sleep instead. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from nanoseek.model import ModelConfig, Transformer

YARN_V3 = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 32, "beta_fast": 32.0,
           "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
YARN_V2 = {**YARN_V3, "mscale": 0.707, "mscale_all_dim": 0.707}


def tiny_config(**overrides) -> ModelConfig:
    """A few-layer DeepSeek-V3 config small enough for CPU tests, with unequal head dims so shape
    mix-ups cannot cancel out."""
    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                  num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=24,
                  qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=1,
                  num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                  routed_scaling_factor=2.5, max_position_embeddings=1280)
    fields.update(overrides)
    return ModelConfig(**fields)


def random_model(config: ModelConfig, std: float = 0.08, seed: int = 0) -> Transformer:
    """Random weights, including a non-zero router bias so noaux_tc selection is exercised."""
    torch.manual_seed(seed)
    model = Transformer(config)
    model.init_weights(std)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, std)
        for moe in model.moe_layers():
            if hasattr(moe.gate, "e_score_correction_bias"):
                moe.gate.e_score_correction_bias.normal_(0.0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many tiny ops that check results, not speed: on a busy 2-core machine OpenMP's
    second thread stalls every tiny op at its barrier (measured 70x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tmp_model_dir(tmp_path):
    return tmp_path / "model"
