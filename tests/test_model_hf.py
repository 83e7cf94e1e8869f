"""nanoseek against Hugging Face transformers' DeepseekV3/V2 on the same weights: logits, greedy
continuations, and checkpoints crossing in both directions."""

import warnings

import pytest
import torch
import transformers

import nanoseek
from conftest import YARN_V2, YARN_V3, random_model, tiny_config

# Every router/attention combination transformers implements.
HF_CASES = {
    "v3-noaux-1group": dict(n_group=1, topk_group=1),
    "v3-noaux-2groups": dict(n_group=2, topk_group=1),
    "v3-noaux-4groups-yarn": dict(n_group=4, topk_group=2, rope_scaling=YARN_V3),
    "v3-qproj-yarn": dict(q_lora_rank=None, n_group=4, topk_group=3, rope_scaling=YARN_V3),
    "v3-first2-dense-no-renorm": dict(first_k_dense_replace=2, norm_topk_prob=False),
    "v3-all-layers-dense": dict(first_k_dense_replace=3),
    "v3-attention-bias-tied": dict(attention_bias=True, tie_word_embeddings=True),
    "v2-greedy": dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy",
                      norm_topk_prob=False, routed_scaling_factor=1.0, q_lora_rank=None),
    "v2-group-limited-yarn": dict(model_type="deepseek_v2", scoring_func="softmax",
                                  topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                  norm_topk_prob=False, routed_scaling_factor=16.0, rope_scaling=YARN_V2),
    "v2-group-limited-qlora": dict(model_type="deepseek_v2", scoring_func="softmax",
                                   topk_method="group_limited_greedy", n_group=2, topk_group=1,
                                   norm_topk_prob=False, first_k_dense_replace=0),
}


def hf_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("case", HF_CASES)
def test_logits_match_transformers(case, tmp_model_dir):
    model = random_model(tiny_config(**HF_CASES[case]))
    model.save_pretrained(tmp_model_dir)
    hf = hf_load(tmp_model_dir)
    ids = torch.randint(0, model.config.vocab_size, (3, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == theirs.shape == (3, 70, model.config.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-4
    # The logits are far from trivially equal: they vary across positions and vocab.
    assert ours.std().item() > 0.1


def test_yarn_changes_logits_and_matches(tmp_model_dir):
    """YaRN on vs off give different models, so the YaRN case above is not vacuous."""
    plain = random_model(tiny_config())
    yarn = random_model(tiny_config(rope_scaling=YARN_V3))
    ids = torch.randint(0, 128, (1, 60))
    with torch.no_grad():
        assert (plain(ids) - yarn(ids)).abs().max() > 1e-3
    assert yarn.config.softmax_scale == pytest.approx(16 ** -0.5 * (0.1 * torch.log(torch.tensor(40.0)).item() + 1) ** 2)


def test_softmax_scale_of_released_configs():
    """docs/facts.md §2: V3 (mscale 1.0) 0.1352338, V2 (0.707) 0.1147214, with cos/sin left unscaled."""
    dims = dict(qk_nope_head_dim=128, qk_rope_head_dim=64, max_position_embeddings=163840)
    v3 = tiny_config(**dims, rope_scaling={**YARN_V3, "original_max_position_embeddings": 4096})
    v2 = tiny_config(**dims, rope_scaling={**YARN_V2, "original_max_position_embeddings": 4096})
    assert v3.softmax_scale == pytest.approx(0.1352338, abs=1e-7)
    assert v2.softmax_scale == pytest.approx(0.1147214, abs=1e-7)
    assert v3.rope_amplitude == v2.rope_amplitude == 1.0


@pytest.mark.parametrize("case", ["v3-noaux-2groups", "v3-qproj-yarn", "v2-group-limited-yarn"])
def test_greedy_continuations_match_transformers_generate(case, tmp_model_dir):
    model = random_model(tiny_config(**HF_CASES[case]), std=0.3, seed=3)
    model.save_pretrained(tmp_model_dir)
    hf = hf_load(tmp_model_dir)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 128, (n,), generator=gen).tolist() for n in (5, 17, 9, 30)]
    ours = nanoseek.generate(model, prompts, max_new_tokens=32, ignore_eos=True)  # as transformers is told above
    for prompt, continuation in zip(prompts, ours):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
        for step_logits in out.logits:
            top2 = step_logits[0].topk(2).values
            assert (top2[0] - top2[1]).item() > 1e-3, "init not peaked enough for an unambiguous greedy check"
        assert continuation == out.sequences[0, len(prompt):].tolist()
        assert len(set(continuation)) > 3  # not a degenerate repeat of one token


def test_generate_stops_at_the_configs_eos_as_transformers_does(tmp_model_dir):
    """The EOS is a token the greedy output emits at some step, so stopping there is observable."""
    config = tiny_config(**HF_CASES["v3-noaux-2groups"])
    prompt = [5, 9, 17, 33, 2, 71]
    free = nanoseek.generate(random_model(config, std=0.3, seed=3), [prompt], max_new_tokens=24, ignore_eos=True)[0]
    eos = next(t for t in free[3:] if free.count(t) == 1)
    stop = free.index(eos)
    model = random_model(config.replace(eos_token_id=eos), std=0.3, seed=3)  # the same weights
    model.save_pretrained(tmp_model_dir)
    hf = hf_load(tmp_model_dir)
    assert hf.generation_config.eos_token_id == eos  # transformers takes it from config.json
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    ours = nanoseek.generate(model, [prompt], max_new_tokens=24)[0]
    assert ours == theirs == free[:stop + 1] and len(ours) < 24
    assert nanoseek.generate(model, [prompt], max_new_tokens=24, ignore_eos=True)[0] == free
    other_eos = free[1]
    assert nanoseek.generate(model, [prompt], 24, eos_token_id=other_eos)[0] == free[:free.index(other_eos) + 1]


@pytest.mark.parametrize("case", ["v3-noaux-4groups-yarn", "v2-group-limited-yarn", "v2-greedy"])
def test_transformers_checkpoint_loads_in_nanoseek(case, tmp_path):
    """A model created and saved by transformers (its own config writer, fused-expert unfusing,
    rope_parameters) loads here with the same logits."""
    ours_cfg = tiny_config(**HF_CASES[case])
    hf_dict = ours_cfg.to_hf_dict()
    rope = hf_dict.pop("rope_scaling")
    hf_dict["rope_parameters"] = ({"rope_type": "yarn", "rope_theta": 10000.0,
                                   **{k: v for k, v in rope.items() if k != "type"}}
                                  if rope else {"rope_type": "default", "rope_theta": 10000.0})
    for key in ("architectures", "torch_dtype", "scoring_func", "moe_layer_freq", "rope_theta", "num_nextn_predict_layers"):
        hf_dict.pop(key, None)
    cls = transformers.DeepseekV3Config if ours_cfg.model_type == "deepseek_v3" else transformers.DeepseekV2Config
    torch.manual_seed(0)
    hf_config = cls(**{k: v for k, v in hf_dict.items() if k != "model_type"})
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    hf.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = nanoseek.load(tmp_path)
    if ours_cfg.model_type == "deepseek_v3":
        # transformers' V3 config declares one MTP layer by default but saves no MTP tensors.
        assert any("MTP" in str(w.message) for w in caught)
        assert len(model.mtp) == 0
    ids = torch.randint(0, 128, (2, 50))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_roundtrip_through_transformers_keeps_logits(tmp_path):
    """nanoseek -> transformers (load + save_pretrained) -> nanoseek gives the same model."""
    model = random_model(tiny_config(rope_scaling=YARN_V3, n_group=4, topk_group=2))
    model.save_pretrained(tmp_path / "a")
    hf_load(tmp_path / "a").save_pretrained(tmp_path / "b")
    back = nanoseek.load(tmp_path / "b")
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        assert (back(ids) - model(ids)).abs().max().item() <= 1e-5
