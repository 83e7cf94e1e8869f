"""Long prompts: chunked prefill gives the same cache and logits as one pass at every chunk size,
and its memory grows linearly with the prompt, never as the T x T score matrix of a full attention."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import YARN_V3, random_model, tiny_config
from nanoseek.infer import Engine
from nanoseek.model.attention import EXPAND_MIN_QUERIES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    # YaRN-scaled, as a long-context model is: the prompts below run well past its original context.
    return random_model(tiny_config(max_position_embeddings=1280, rope_scaling=YARN_V3))


def one_pass(model, prompts):
    """The reference: each prompt alone through the naive form in one call -> (cache rows, last logits)."""
    rows, logits = [], []
    with torch.no_grad():
        for prompt in prompts:
            cache = model.new_cache(1, len(prompt))
            logits.append(model(torch.tensor([prompt]), cache, absorb=False)[0, -1])
            rows.append(cache.kv[:, 0])
    return rows, torch.stack(logits)


# 1 and 50: every chunk after the first attends in latent (absorbed) form; 128 and 300: the cached
# prefix is expanded (EXPAND_MIN_QUERIES); 1000: one chunk, no cached prefix at all.
@pytest.mark.parametrize("chunk", [1, 50, EXPAND_MIN_QUERIES, 300, 1000])
def test_chunked_prefill_equals_one_pass(model, chunk):
    generator = torch.Generator().manual_seed(chunk)
    prompts = [torch.randint(0, 128, (n,), generator=generator).tolist() for n in (700, 333)]
    rows, expected = one_pass(model, prompts)
    cache, logits, _ = Engine(model, eos_token_ids=[], prefill_chunk=chunk).prefill(prompts)
    assert cache.lengths.tolist() == [700, 333]
    assert (logits - expected).abs().max() < 1e-4
    for row, (prompt, reference) in enumerate(zip(prompts, rows)):
        assert (cache.kv[:, row, :len(prompt)] - reference).abs().max() < 1e-4


class LargestTensor(TorchDispatchMode):
    """The bytes of the largest tensor any op returns while active. Python's tracemalloc does not see
    torch's allocator; this sees every intermediate, but not a fused kernel's internal tiles, which
    are bounded by design. Under inference mode a composite op such as SDPA arrives whole: it is
    decomposed here, so the kernel it picks (flash, or the math path's matmuls) is what is seen."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        with self:  # the mode is off inside its own handler: back on for the decomposed ops
            out = func.decompose(*args, **(kwargs or {}))
        if out is NotImplemented:
            out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel() * leaf.element_size())
        return out


def largest_tensor_of_prefill(model, length, chunk):
    prompt = torch.randint(0, 128, (length,), generator=torch.Generator().manual_seed(0)).tolist()
    with LargestTensor() as probe:
        Engine(model, eos_token_ids=[], prefill_chunk=chunk).prefill([prompt])
    return probe.largest


def test_long_prefill_never_holds_a_score_matrix(model):
    """4,096 tokens in chunks of 256: nothing may be as large as the scores of all heads for ONE
    chunk over the prefix (heads x chunk x T fp32); one head's full T x T matrix is 4x that. Memory
    must also grow linearly: doubling T at most doubles the largest tensor."""
    long_model = random_model(tiny_config(max_position_embeddings=8192))
    length, chunk = 4096, 256
    bound = long_model.config.num_attention_heads * chunk * length * 4
    assert length * length * 4 > bound
    largest = largest_tensor_of_prefill(long_model, length, chunk)
    assert largest < bound
    assert largest_tensor_of_prefill(long_model, length // 2, chunk) * 2 >= largest
    # The probe sees score matrices when they exist: the same prefill with SDPA forced onto its
    # math path materialises [heads, chunk, T] scores and breaks the bound.
    with sdpa_kernel(SDPBackend.MATH):
        assert largest_tensor_of_prefill(long_model, length, chunk) >= bound
