"""nn.Linear with two extra paths for the few-row products of decoding on CPU.

Decoding multiplies a handful of rows by each weight matrix, so its speed is the speed at which
weights stream from memory. MKL's fp32 product (what F.linear calls) is poor at this on the 2-core
dev CPU: one row streams cold weights at ~11 GB/s on one thread, 2-8 rows at 5-8 GB/s.

* One row, inside torch.compile: `(weight * x).sum(-1)`, which inductor compiles into one reduction
  loop over the weight on every core: ~25 GB/s.
* A few rows, eager, inside `packed_weights()`: oneDNN's product with the weight reordered once into
  its blocked layout: 16-32 GB/s. The packed copy is kept beside the weight (twice the weight memory)
  and remade whenever the weight changes (an optimizer step, a load), so it is never stale.

Everywhere else this is exactly nn.Linear: state-dict keys, initialisation, autograd.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# Up to this many rows the packed product beats MKL (measured 1-8 rows on the dev CPU); prefill
# chunks are far longer and stay on F.linear.
PACKED_MAX_ROWS = 32

_packing = False


@contextmanager
def packed_weights() -> Iterator[None]:
    """Within this block, few-row products without autograd on CPU use oneDNN-packed weights."""
    global _packing
    previous, _packing = _packing, True
    try:
        yield
    finally:
        _packing = previous


def one_row_on_cpu_under_compile(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and torch.compiler.is_compiling() and x.numel() == x.shape[-1]


def use_packed(x: torch.Tensor) -> bool:
    return (_packing and x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and x.numel() <= PACKED_MAX_ROWS * x.shape[-1] and torch.backends.mkldnn.is_available())


class PackedWeight:
    """The oneDNN-packed copy of a weight [out, in], or of each expert of a stacked weight [E, out, in].
    Keyed by the weight's storage and version counter: any in-place update or replacement repacks."""

    def __init__(self):
        self._key: tuple[int, int] | None = None
        self._packed: torch.Tensor | list[torch.Tensor] | None = None

    def __deepcopy__(self, memo) -> "PackedWeight":
        return PackedWeight()  # a cache: copies start empty (oneDNN's opaque tensors cannot be copied)

    def get(self, weight: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        key = (weight.data_ptr(), weight._version)
        if key != self._key:
            pack = lambda w: torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACKED_MAX_ROWS)  # noqa: E731
            self._packed = [pack(w) for w in weight.unbind(0)] if weight.dim() == 3 else pack(weight)
            self._key = key
        return self._packed


def packed_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class Linear(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.packed = PackedWeight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if one_row_on_cpu_under_compile(x):
            out = (self.weight * x.reshape(1, -1)).sum(dim=-1)
            if self.bias is not None:
                out = out + self.bias
            return out.view(*x.shape[:-1], -1)
        if use_packed(x):
            return packed_product(x, self.packed.get(self.weight), self.bias)
        return F.linear(x, self.weight, self.bias)
