"""The CPU decode fast paths against their references: oneDNN-packed weights (eager, few rows), the
one-row multiply-reduce and gathered experts (inside torch.compile), and the engine's compiled
single-row decode step against eager decoding and a full forward."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

import nanoseek.model.linear as linear
import nanoseek.model.moe as moe_module
from conftest import random_model, tiny_config
from nanoseek.infer import DecodeBatch, Engine, SamplingParams
from nanoseek.model.linear import Linear, packed_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def count_packed_products(monkeypatch) -> list[int]:
    calls = []
    real = linear.packed_product

    def counting(x, packed, bias=None):
        calls.append(x.shape[0])
        return real(x, packed, bias)

    monkeypatch.setattr(linear, "packed_product", counting)
    monkeypatch.setattr(moe_module, "packed_product", counting)
    return calls


@pytest.mark.parametrize("rows", [1, 5, linear.PACKED_MAX_ROWS])
def test_packed_linear_equals_linear(rows, monkeypatch):
    calls = count_packed_products(monkeypatch)
    layer = Linear(48, 80, bias=True)
    x = torch.randn(rows, 48)
    with torch.no_grad(), packed_weights():
        fast = layer(x)
    assert calls == [rows]
    assert (fast - F.linear(x, layer.weight, layer.bias)).abs().max().item() < 1e-5


def test_packed_path_only_for_few_rows_without_autograd(monkeypatch):
    calls = count_packed_products(monkeypatch)
    layer = Linear(48, 80, bias=False)
    with packed_weights():
        with torch.no_grad():
            layer(torch.randn(linear.PACKED_MAX_ROWS + 1, 48))  # a prefill chunk
        out = layer(torch.randn(2, 48, requires_grad=True))  # training: must stay differentiable
        out.sum().backward()
    with torch.no_grad():
        layer(torch.randn(2, 48))  # outside the block
    assert calls == []
    assert layer.weight.grad is not None


def test_packed_weights_follow_weight_updates():
    layer = Linear(32, 16, bias=False)
    x = torch.randn(3, 32)
    with torch.no_grad(), packed_weights():
        before = layer(x)
        layer.weight.mul_(-2.0)  # an optimizer step updates in place: the packed copy must follow
        after_update = layer(x)
        layer.weight = torch.nn.Parameter(torch.randn(16, 32))  # a load may replace the tensor
        after_replace = layer(x)
    assert (after_update + 2 * before).abs().max().item() < 1e-5
    assert (after_replace - F.linear(x, layer.weight)).abs().max().item() < 1e-5


@pytest.mark.parametrize("tokens", [1, 7])
def test_packed_and_gathered_experts_equal_reference(tokens, monkeypatch):
    calls = count_packed_products(monkeypatch)
    moe = random_model(tiny_config()).moe_layers()[0]
    x = torch.randn(tokens, 64)
    with torch.no_grad():
        _, weights, indices = moe.gate(x)
        reference = moe.experts.forward_reference(x, weights, indices)
        with packed_weights():
            packed = moe.experts(x, weights, indices)
        gathered = moe.experts.gathered(x, weights, indices)
    assert len(calls) == 2 * indices.unique().numel()  # gate_up and down of every selected expert
    assert (packed - reference).abs().max().item() < 1e-5
    assert (gathered - reference).abs().max().item() < 1e-5


def test_one_row_linear_compiles_to_a_reduction_not_a_matmul():
    layer = Linear(64, 96, bias=True)
    compiled = torch.compile(layer, dynamic=False)
    with torch.no_grad():
        one_row = torch.randn(1, 1, 64)
        out, code = run_and_get_code(compiled, one_row)
        assert (out - F.linear(one_row, layer.weight, layer.bias)).abs().max().item() < 1e-5
        assert not any("mm" in line for source in code for line in source.splitlines() if "extern_kernels" in line)
        # Many rows keep the ordinary product.
        many = torch.randn(2, 5, 64)
        out, code = run_and_get_code(compiled, many)
        assert (out - F.linear(many, layer.weight, layer.bias)).abs().max().item() < 1e-5
        assert any("extern_kernels" in source and "mm" in source for source in code)


@pytest.mark.slow
def test_compiled_single_row_decode_equals_eager_and_full_forward():
    torch._dynamo.reset()
    model = random_model(tiny_config())
    compiled = Engine(model, eos_token_ids=[], compile=True)
    eager = Engine(model, eos_token_ids=[], packed_weights=False)
    params = SamplingParams(max_new_tokens=12)
    compiled.warm_up(rows=4)  # what `serve --compile` does at startup: the compile happens here
    with torch.compiler.set_stance("fail_on_recompile"):
        # A lone client of a server: one live row in a batch of 4 (as the server's DecodeBatch).
        serving, groups = DecodeBatch(compiled, 4, capacity=40), compiled.sequences([[3, 4, 5, 6, 7]], params)
        serving.add(groups)
        while serving.sequences:
            serving.step()
    compiled.warm_up()  # offline calls make batches of exactly their rows
    with torch.compiler.set_stance("fail_on_recompile"):
        first = compiled.generate([[3, 4, 5, 6, 7]], params)[0][0].tokens
    assert groups[0][0].tokens == first
    assert first == eager.generate([[3, 4, 5, 6, 7]], params)[0][0].tokens
    # Other prompt lengths and cache capacities reuse the one dynamic-shape graph.
    with torch.compiler.set_stance("fail_on_recompile"):
        for prompt in ([9, 8], list(range(10, 41))):
            assert compiled.generate([prompt], params)[0][0].tokens == eager.generate([prompt], params)[0][0].tokens
        # Several rows decode through the padded compiled step and agree with the eager engine.
        batch = compiled.generate([[1, 2, 3], [4, 5, 6, 7, 8, 9]], params)
    assert [c[0].tokens for c in batch] == [c[0].tokens for c in eager.generate([[1, 2, 3], [4, 5, 6, 7, 8, 9]], params)]
    # And eager decoding is the plain model run over the whole sequence each step.
    ids = [3, 4, 5, 6, 7]
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert first == ids[5:]


def test_a_model_that_has_decoded_can_still_be_deep_copied():
    model = random_model(tiny_config())
    Engine(model, eos_token_ids=[]).generate([[1, 2, 3]], SamplingParams(max_new_tokens=3))  # packs the weights
    clone = copy.deepcopy(model)  # e.g. the frozen reference policy of RL
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
