"""CUDA check: the code paths tests/ holds on CPU, run on a GPU in one short session that records everything.

    PYTHONPATH=. python3 benchmarks/cuda_check.py --out OUT            # on the GPU machine (--device cuda)
    python benchmarks/cuda_check.py --device cpu --quick --out OUT     # the same script, small shapes, on CPU

Everything here was developed and tested on CPU, and GPU time comes in short, rare runs, so this one
script asks every question at once. Each check is independent: one that raises is recorded with its
exception (and what it measured before that) and the next one runs. A check is stopped by an alarm
after --check-timeout-s, or at the run's hard limit --limit-s (later checks are then skipped); the
speed checks skip what is left of them once --budget-s has passed. Defaults keep a GPU run under
about 4.5 minutes. The checks, in the order they run (essential first, compile-heavy and speed last):

  parity_fp32        the same random weights on CPU and the device, full forward in strict fp32 (TF32
                     off for cuBLAS and cuDNN): max |logit diff| <= 1e-4, and the share of MoE routing
                     choices that agree (a flipped near-tie explains a large diff). Tiny V3/V2/YaRN
                     configs (as tests/conftest.py) and configs/bench-60m.json.
  transformers_fp32  our save_pretrained folder loaded by transformers' AutoModelForCausalLM on the
                     device: max |logit diff| <= 1e-4 in strict fp32, with transformers' default experts
                     implementation and, if that fails or misses, its eager one; greedy continuations
                     equal to transformers' generate (tests/test_model_hf.py on the device).
  bf16               model.to(bfloat16) on the device: logits finite, max |diff| and top-1 agreement
                     against the fp32 logits of the same weights (peaked output head, so top-1 is sharp).
  grouped_experts    bf16 on the device: the experts' grouped-GEMM path (torch._grouped_mm) and the loop
                     over experts, output and gradients, both against the fp32 loop (tiny-v3 and the
                     bench-1b layer, 1 to 4096 tokens); a MoE layer's forward and backward under
                     torch.cuda.set_sync_debug_mode("error") (no host synchronisation).
  absorbed_vs_naive  on the device, strict fp32: absorbed vs naive MLA, cached incremental decoding vs a
                     full forward, expanded (chunked prefill) vs latent form (tests/test_model_forms.py).
  fused_attention    bf16 on the device, bench-60m at 1024 tokens: the profiler's operator names of a
                     training forward + backward must include a fused SDPA kernel (flash, memory-
                     efficient or cuDNN, forward and backward), i.e. MLA's padded head sizes do not
                     fall back to the math path that materialises the score matrix; the same step
                     under sdpa_kernel(FLASH_ATTENTION) alone runs, as close to fp32 as the default.
  engine_greedy      nanoseek.infer.Engine, ragged prompts (one long enough for chunked prefill): greedy
                     tokens on the device equal those on CPU (token match rate), and the device engine
                     equals a no-cache full-forward reference.
  engine_sampling    seeded sampling repeats exactly (alone, in a crowd, twice), another seed differs,
                     n samples share a prompt and differ, logprobs finite and equal to log_softmax(z/T).
  engine_bf16        the engine on a bf16 model: runs, logprobs finite; token agreement with fp32.
  train              nanoseek.train.pretrain (what `nanoseek pretrain` runs) with configs/pretrain-tiny.yaml
                     on a corpus built in-process, under bf16 autocast (what precision=auto means on
                     CUDA): loss falls, tokens/s, checkpoints written, the final folder loads and
                     generates. If bf16 autocast raises, the check fails with that error, and training
                     goes on in fp32 so that resume and compile are still exercised on the device.
  train_resume       the run above with final/ removed, resumed from its middle checkpoint: the
                     recomputed per-step losses against the uninterrupted ones.
  engine_compile     Engine(compile=True) (batch-1 decode through torch.compile) gives the eager greedy
                     tokens; compile time and dynamo's graph and graph-break counts.
  train_compile      the training run with its `compile` option: first-step loss against eager, loss falls.
  speed_decode       informative: decode tok/s of our Engine on bench-60m (512-token prompts, batch 1
                     and 8, bf16 and fp32, eager and compiled) and of transformers' generate, with the
                     protocol and functions of benchmarks/decode.py.
  speed_train        informative: training tokens/s and MFU on bench-60m, 8x512, bf16 autocast,
                     forward + backward + fused AdamW (benchmarks/train.py's steps), ours eager and with
                     compile_blocks, and transformers; fp32 figures of both if ours fails under autocast.

Output: one line per check (name, PASS/FAIL/SKIP, seconds, key figures), everything as JSON in
OUT/cuda_check.json (rewritten after every check, so a run killed half-way keeps what it measured),
the training runs' metrics.jsonl beside it, and the JSON as the last line. Exit status 1 if any check
failed. --quick shrinks shapes and steps and, on CPU, compiles only the tiny model (compiling
bench-60m takes minutes on 2 cores). Needs torch, transformers, safetensors, tokenizers, numpy,
pyyaml, tqdm and matplotlib; nothing of the server (fastapi, uvicorn).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the tiny configs and random weights of the test suite

import nanoseek.model.attention as attention  # noqa: E402
from benchmarks.decode import measure, peaked_model, run_hf, run_ours  # noqa: E402
from benchmarks.train import nanoseek_step, transformers_step  # noqa: E402
from nanoseek.infer import Engine, SamplingParams  # noqa: E402
from nanoseek.model import ModelConfig, Transformer  # noqa: E402
from nanoseek.model.checkpoint import load  # noqa: E402
from nanoseek.model.moe import MoE  # noqa: E402
from nanoseek.train.flops import flops_per_token, peak_flops  # noqa: E402
from nanoseek.train.metrics import read_metrics  # noqa: E402
from nanoseek.train.pretrain import compile_blocks  # noqa: E402
from conftest import YARN_V2, YARN_V3, random_model as random_weights, tiny_config  # noqa: E402

BENCH_CONFIG = os.path.join(ROOT, "configs", "bench-60m.json")
BENCH_1B_CONFIG = os.path.join(ROOT, "configs", "bench-1b.json")
PRETRAIN_CONFIG = os.path.join(ROOT, "configs", "pretrain-tiny.yaml")
TOLERANCE = 1e-4  # the fp32 bar of the test suite against transformers

TINY_CASES = {
    "tiny-v3": dict(n_group=2, topk_group=1),
    "tiny-v3-qproj-yarn": dict(q_lora_rank=None, n_group=4, topk_group=3, rope_scaling=YARN_V3),
    "tiny-v2-yarn": dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="group_limited_greedy",
                         n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=16.0,
                         rope_scaling=YARN_V2),
}


def config_of(case: str) -> ModelConfig:
    return ModelConfig.from_file(BENCH_CONFIG) if case == "bench-60m" else tiny_config(**TINY_CASES[case])


def random_model(case: str, std: float | None = None, seed: int = 0) -> Transformer:
    """Random weights on CPU, biases and the noaux_tc router bias non-zero (tests/conftest.py)."""
    std = std if std is not None else (0.02 if case == "bench-60m" else 0.08)
    return random_weights(config_of(case), std, seed)


def greedy_model(case: str) -> Transformer:
    """Weights whose greedy continuations are unambiguous, so CPU and device can be held equal:
    bench-60m with a peaked output head (benchmarks/decode.py), tiny at std 0.3 (tests/test_model_hf.py)."""
    if case == "bench-60m":
        return peaked_model(config_of(case)).eval()
    return random_model(case, std=0.3, seed=3)


def on(model: Transformer, device: torch.device, dtype: torch.dtype | None = None) -> Transformer:
    """A copy of the model on the device (the CPU original stays the reference)."""
    moved = copy.deepcopy(model).to(device)
    return moved.to(dtype) if dtype is not None else moved


def token_ids(batch: int, seq: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def strict_fp32():
    """TF32 off for cuBLAS and cuDNN: a parity check against CPU fp32 must not carry TF32's 10-bit
    mantissa. The previous settings come back afterwards, so training and speed run with the defaults."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def routing(model: Transformer) -> list[torch.Tensor]:
    """The expert set each token chose in each MoE layer during the last forward (sorted, on CPU)."""
    return [m.last_indices.sort(dim=-1).values.cpu() for m in model.moe_layers()]


def routing_agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float | None:
    if not a:
        return None
    return float(torch.stack([(x == y).all(dim=-1).float().mean() for x, y in zip(a, b)]).mean())


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def load_hf(folder: str, device: torch.device, dtype: torch.dtype, experts: str | None = None):
    """transformers' model for one of our folders; `experts` picks its experts implementation
    (None: its default, grouped_mm where the hardware has it)."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    kwargs = {"experts_implementation": experts} if experts else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).to(device).eval()
    model.generation_config.eos_token_id = None
    return model


def error_text(error: BaseException) -> str:
    """The exception and the last frames of its traceback, short enough for the JSON."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return text[-2500:]


def dynamo_counts() -> dict:
    """Graphs compiled and graph breaks since the counters were last cleared. Compiled code itself
    is kept across checks (no torch._dynamo.reset()), as it would be in one long-lived process."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    return {"unique_graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(breaks.values()),
            "graph_break_reasons": [reason[:200] for reason in list(breaks)[:4]]}


# ---- the checks ------------------------------------------------------------------------------------
# Each takes (fig, ctx): it writes its figures into `fig` as it goes (an exception keeps what is
# there), sets fig["summary"] for the printed line, and returns whether it passed.


class Context:
    """What the checks share: device, sizes, the scratch folder, and the time budget."""

    def __init__(self, device: torch.device, quick: bool, work: Path, budget_s: float, started: float):
        self.device, self.quick, self.work, self.budget_s, self.started = device, quick, work, budget_s, started
        self.corpus: tuple[Path, Path] | None = None
        self.train_precision = "bf16"  # what `train` ran with; resume and compile follow it
        # Compiling bench-60m takes minutes on 2 CPU cores: the CPU smoke test leaves the compiled
        # speed figures out (engine_compile and train_compile still compile on CPU).
        self.compile_speed = device.type != "cpu"

    def over_budget(self) -> bool:
        return time.perf_counter() - self.started > self.budget_s

    def model_cases(self) -> list[str]:
        return list(TINY_CASES) + ["bench-60m"]


def check_parity_fp32(fig: dict, ctx: Context) -> bool:
    ok = True
    with strict_fp32():
        for case in ctx.model_cases():
            model = random_model(case)
            seq = 64 if ctx.quick else (256 if case == "bench-60m" else 70)
            ids = token_ids(2, seq, model.config.vocab_size)
            with torch.no_grad():
                reference = model(ids)
                reference_routes = routing(model)
                device_model = on(model, ctx.device)
                logits = device_model(ids.to(ctx.device))
            diff = max_diff(logits, reference)
            fig[case] = {"max_abs_diff": diff, "logit_std": float(reference.std()),
                         "routing_agreement": routing_agreement(reference_routes, routing(device_model))}
            ok &= diff <= TOLERANCE
            del device_model
    fig["summary"] = "max|diff| " + ", ".join(f"{c} {fig[c]['max_abs_diff']:.1e}" for c in ctx.model_cases())
    return ok


def check_transformers_fp32(fig: dict, ctx: Context) -> bool:
    import transformers

    fig["transformers"] = transformers.__version__
    ok = True
    with strict_fp32():
        for case in ctx.model_cases():
            model = random_model(case)
            folder = str(ctx.work / "hf" / case)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.save_pretrained(folder)
            seq = 64 if ctx.quick else (256 if case == "bench-60m" else 70)
            ids = token_ids(2, seq, model.config.vocab_size).to(ctx.device)
            with torch.no_grad():
                ours = on(model, ctx.device)(ids)
            entry = fig[case] = {}
            # Default experts implementation first (grouped_mm on recent GPUs); if that fails or
            # misses the bar, also the plain loop, so the run tells which part differs.
            for experts in (None, "eager"):
                key = experts or "default"
                try:
                    hf = load_hf(folder, ctx.device, torch.float32, experts)
                    with torch.no_grad():
                        entry[key] = max_diff(hf(ids).logits, ours)
                    entry[f"{key}_experts_implementation"] = getattr(hf.config, "_experts_implementation", None)
                    del hf
                except Exception as error:  # noqa: BLE001 (recorded, the other implementation still runs)
                    entry[key] = None
                    entry[f"{key}_error"] = error_text(error)
                if entry[key] is not None and entry[key] <= TOLERANCE:
                    break
            ok &= any(entry.get(k) is not None and entry[k] <= TOLERANCE for k in ("default", "eager"))

        # Greedy continuations against transformers.generate, on the device (tests/test_model_hf.py).
        model = greedy_model("tiny-v3")
        folder = str(ctx.work / "hf" / "tiny-v3-greedy")
        model.save_pretrained(folder)
        gen = torch.Generator().manual_seed(2)
        prompts = [torch.randint(2, 128, (n,), generator=gen).tolist() for n in (5, 17, 9, 30)]
        ours = Engine(on(model, ctx.device), eos_token_ids=[]).generate(prompts, SamplingParams(max_new_tokens=32))
        hf = load_hf(folder, ctx.device, torch.float32)
        same = []
        for prompt, (completion,) in zip(prompts, ours):
            out = hf.generate(torch.tensor([prompt], device=ctx.device), max_new_tokens=32, do_sample=False,
                              pad_token_id=0)
            same.append(completion.tokens == out[0, len(prompt):].tolist())
        fig["greedy_equal_to_generate"] = f"{sum(same)}/{len(same)}"
        ok &= all(same)
    best = {c: min((v for k, v in fig[c].items() if k in ("default", "eager") and v is not None), default=None)
            for c in ctx.model_cases()}
    fig["summary"] = ("max|diff| " + ", ".join(f"{c} {'error' if v is None else f'{v:.1e}'}" for c, v in best.items())
                      + f"; greedy = generate {fig['greedy_equal_to_generate']}")
    return ok


def check_bf16(fig: dict, ctx: Context) -> bool:
    ok = True
    for case in ("tiny-v3", "bench-60m"):
        model = greedy_model(case)
        seq = 64 if ctx.quick else 256
        ids = token_ids(2, seq, model.config.vocab_size).to(ctx.device)
        with torch.no_grad():
            fp32 = on(model, ctx.device)(ids).float()
            bf16 = on(model, ctx.device, torch.bfloat16)(ids).float()
        finite = bool(torch.isfinite(bf16).all())
        agreement = float((fp32.argmax(-1) == bf16.argmax(-1)).float().mean())
        fig[case] = {"finite": finite, "max_abs_diff": max_diff(bf16, fp32),
                     "max_abs_fp32_logit": float(fp32.abs().max()), "top1_agreement": agreement}
        # bf16 keeps 8 bits of mantissa: the bar is that it runs, stays finite and mostly agrees.
        ok &= finite and agreement >= 0.8
    fig["summary"] = "; ".join(f"{c} top-1 {v['top1_agreement']:.3f}, max|diff| {v['max_abs_diff']:.2f} "
                               f"(of {v['max_abs_fp32_logit']:.1f})" for c, v in fig.items())
    return ok


def rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).norm() / ref.norm())


def host_syncs(ctx: Context, fn: Callable[[], None]) -> str:
    """Runs fn with CUDA's sync debug mode raising at the first host synchronisation: "none", or the
    error and where it happened."""
    if ctx.device.type != "cuda":
        fn()
        return "not checked on CPU"
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "none"
    except RuntimeError as error:
        return error_text(error)[-800:]
    finally:
        torch.cuda.set_sync_debug_mode(0)


def check_grouped_experts(fig: dict, ctx: Context) -> bool:
    """RoutedExperts' grouped-GEMM path (torch._grouped_mm, what a bf16 forward on CUDA takes) against
    the loop over experts on the same bf16 weights: output and gradients, each measured as
    ||x - ref|| / ||ref|| against the loop in fp32. Passes when the grouped path's error is within
    bf16 rounding (<= 2x the bf16 loop's + 1e-3). Then a bf16 MoE layer's forward and backward, and a
    whole bf16 training step's, under torch.cuda.set_sync_debug_mode("error"): the MoE one must not
    synchronise with the host; the whole step is reported."""
    cases = {"tiny-v3": (tiny_config(**TINY_CASES["tiny-v3"]), (1, 37))}
    if not ctx.quick:  # the 1B config's layer in bf16 takes minutes on a CPU
        cases["bench-1b"] = (ModelConfig.from_file(BENCH_1B_CONFIG), (1, 32, 4096))
    ok = True
    for case, (config, token_counts) in cases.items():
        torch.manual_seed(0)
        moe = MoE(config).to(ctx.device)
        torch.nn.init.normal_(moe.gate.weight, std=0.1)
        for p in moe.experts.parameters():
            torch.nn.init.normal_(p, std=0.05)
        for tokens in token_counts:
            x = torch.randn(tokens, config.hidden_size, device=ctx.device)
            with torch.no_grad():
                _, weights, indices = moe.gate(x)
            params = {"x": x, "weights": weights, "gate_up_proj": moe.experts.gate_up_proj, "down_proj": moe.experts.down_proj}
            grad_out = torch.randn(tokens, config.hidden_size, device=ctx.device)

            def run(path: str, dtype: torch.dtype) -> dict:
                leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in params.items()}
                experts = copy.deepcopy(moe.experts).to(dtype)
                experts.gate_up_proj, experts.down_proj = (torch.nn.Parameter(leaves["gate_up_proj"]),
                                                           torch.nn.Parameter(leaves["down_proj"]))
                fn = experts.forward_reference if path == "loop" else experts
                out = fn(leaves["x"], leaves["weights"], indices)
                grads = torch.autograd.grad(out, [experts.gate_up_proj, experts.down_proj, leaves["x"], leaves["weights"]],
                                            grad_out.to(out.dtype))
                return dict(zip(["out", "gate_up_proj", "down_proj", "x", "weights"], [out, *grads]))

            ref, loop, grouped = run("loop", torch.float32), run("loop", torch.bfloat16), run("dispatch", torch.bfloat16)
            row = {}
            for name in ref:
                row[name] = {"grouped": rel_error(grouped[name], ref[name]), "loop_bf16": rel_error(loop[name], ref[name])}
                ok &= bool(torch.isfinite(grouped[name]).all()) and row[name]["grouped"] <= 2 * row[name]["loop_bf16"] + 1e-3
            fig[f"{case}_n{tokens}"] = row
        # No host synchronisation in a bf16 MoE layer's forward and backward (the CUDA fast path).
        layer = copy.deepcopy(moe).to(torch.bfloat16)
        x = torch.randn(2, 64, config.hidden_size, device=ctx.device, dtype=torch.bfloat16, requires_grad=True)
        layer(x)  # warm-up outside the check: first calls may load modules or query the device
        fig[f"{case}_moe_layer_syncs"] = host_syncs(ctx, lambda: layer(x).float().square().mean().backward())
        ok &= fig[f"{case}_moe_layer_syncs"] in ("none", "not checked on CPU")
    # The whole training step (informative: the loss and other layers may synchronise legitimately).
    model = random_model("tiny-v3").to(ctx.device).train()
    ids = token_ids(2, 65, model.config.vocab_size).to(ctx.device)
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
        def train_step():
            model.compute_loss(ids[:, :-1], ids[:, 1:], mtp_weight=0.0)["loss"].backward()
        train_step()
        fig["train_step_syncs"] = host_syncs(ctx, train_step)
    worst = max(v["grouped"] for k, r in fig.items() if isinstance(r, dict) for v in r.values())
    fig["summary"] = (f"worst rel err of grouped bf16 vs fp32 loop {worst:.1e}; MoE syncs "
                      f"{fig.get('bench-1b_moe_layer_syncs', fig['tiny-v3_moe_layer_syncs'])[:60]}; train step syncs {fig['train_step_syncs'][-80:]}")
    return ok


def check_absorbed_vs_naive(fig: dict, ctx: Context) -> bool:
    ok = True
    expand_min_queries = attention.EXPAND_MIN_QUERIES
    with strict_fp32(), torch.no_grad():
        for case in ("tiny-v3", "tiny-v3-qproj-yarn", "bench-60m"):
            model = on(random_model(case), ctx.device)
            vocab = model.config.vocab_size
            ids = token_ids(2, 48, vocab).to(ctx.device)
            naive = model(ids, model.new_cache(2, 64), absorb=False)
            absorbed = model(ids, model.new_cache(2, 64), absorb=True)
            full = model(ids)
            cache = model.new_cache(2, 64)
            pieces = [model(ids[:, :20], cache), model(ids[:, 20:31], cache)]  # naive prefill, absorbed chunk
            pieces += [model(ids[:, t:t + 1], cache) for t in range(31, 48)]  # single-token decode
            # A chunk of >= EXPAND_MIN_QUERIES over a cached prefix expands the latents; the same
            # chunk in latent form is the reference.
            long = token_ids(2, 150, vocab, seed=2).to(ctx.device)
            cache = model.new_cache(2, 200)
            model(long[:, :10], cache)
            expanded = model(long, cache)
            attention.EXPAND_MIN_QUERIES = 10**9
            try:
                cache.lengths.fill_(10)
                latent = model(long, cache)
            finally:
                attention.EXPAND_MIN_QUERIES = expand_min_queries
            fig[case] = {"absorbed_vs_naive": max_diff(absorbed, naive),
                         "incremental_vs_full": max_diff(torch.cat(pieces, dim=1), full),
                         "expanded_vs_latent": max_diff(expanded, latent)}
            ok &= all(v <= TOLERANCE for v in fig[case].values())
    fig["summary"] = "largest diff " + "; ".join(f"{c} {max(v.values()):.1e}" for c, v in fig.items())
    return ok


FUSED_SDPA = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention")


def check_fused_attention(fig: dict, ctx: Context) -> bool:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    model = on(random_model("bench-60m"), ctx.device, torch.bfloat16).train()
    ids = token_ids(2, 256 if ctx.quick else 1024, model.config.vocab_size).to(ctx.device)

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        logits = model(ids)
        logits.float().square().mean().backward()
        return logits.detach()

    default = step()  # warm-up outside the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(ctx.device)
    names = {event.key for event in prof.key_averages()}
    fused = sorted(n for n in names if any(f in n for f in FUSED_SDPA))
    fig["fused_ops"] = fused
    fig["kernels"] = sorted(n for n in names if any(w in n.lower() for w in ("flash", "fmha", "attention")))[:12]
    has_forward = any(not n.endswith("backward") for n in fused)
    has_backward = any(n.endswith("backward") for n in fused)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        flash_only = step()
    # Two bf16 kernels round differently (and a near-tie in the router can flip): each is measured
    # against the fp32 forward of the same weights, and flash alone must be as close as the default.
    with strict_fp32(), torch.no_grad():
        reference = model.float()(ids)
    fig["default_rel_err"], fig["flash_only_rel_err"] = rel_error(default, reference), rel_error(flash_only, reference)
    ok = has_forward and has_backward and fig["flash_only_rel_err"] <= 2 * fig["default_rel_err"] + 1e-3
    fig["summary"] = (f"fused SDPA ops {', '.join(n.split('::')[-1] for n in fused) or 'none'}; rel err vs fp32: "
                      f"default {fig['default_rel_err']:.1e}, flash-only {fig['flash_only_rel_err']:.1e}")
    return ok


def engine_prompts(quick: bool, vocab: int) -> list[list[int]]:
    """Ragged prompts; the last is long enough for chunked prefill at prefill_chunk=128 (and, at full
    size, for a second chunk of >= 128 queries, which takes the expanded form)."""
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in (5, 17, 9, 30, 140 if quick else 300)]


def full_forward_greedy(model: Transformer, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding by re-running the whole sequence without a cache (tests/test_engine.py)."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(model(torch.tensor([ids], device=model.device))[0, -1].argmax()))
            ids.append(out[-1])
    return out


def match_rate(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b)]
    return sum(x == y for x, y in pairs) / max(len(pairs), 1)


def greedy_tokens(model: Transformer, prompts: list[list[int]], new: int, **engine_args) -> list[list[int]]:
    engine = Engine(model, eos_token_ids=[], prefill_chunk=128, **engine_args)
    return [c[0].tokens for c in engine.generate(prompts, SamplingParams(max_new_tokens=new))]


def check_engine_greedy(fig: dict, ctx: Context) -> bool:
    ok = True
    new = 16 if ctx.quick else 32
    with strict_fp32():
        for case in ("tiny-v3", "bench-60m"):
            model = greedy_model(case)
            prompts = engine_prompts(ctx.quick, model.config.vocab_size)
            device_model = on(model, ctx.device)  # before the CPU engine packs the original's weights
            cpu = greedy_tokens(model, prompts, new)
            device = greedy_tokens(device_model, prompts, new)
            reference = full_forward_greedy(device_model, prompts[1], new)
            fig[case] = {"match_rate_vs_cpu": match_rate(device, cpu),
                         "identical_sequences": f"{sum(a == b for a, b in zip(device, cpu))}/{len(prompts)}",
                         "equal_to_full_forward": device[1] == reference,
                         "distinct_tokens": len({t for row in device for t in row})}
            ok &= device == cpu and device[1] == reference
    fig["summary"] = "; ".join(f"{c} vs CPU {v['match_rate_vs_cpu']:.3f} ({v['identical_sequences']} identical), "
                               f"= full forward {v['equal_to_full_forward']}" for c, v in fig.items())
    return ok


def check_engine_sampling(fig: dict, ctx: Context) -> bool:
    model = on(random_model("tiny-v3"), ctx.device)
    prompts = engine_prompts(True, model.config.vocab_size)[:3]
    engine = Engine(model, eos_token_ids=[])
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=30, top_p=0.9, seed=1234)
    alone = engine.generate([prompts[0]], params)[0][0].tokens
    again = engine.generate([prompts[0]], params)[0][0].tokens
    crowd = engine.generate([prompts[1], prompts[0], prompts[2]],
                            [SamplingParams(max_new_tokens=5, temperature=1.0), params,
                             SamplingParams(max_new_tokens=30, temperature=0.5, seed=9)])[1][0].tokens
    other = engine.generate([prompts[0]], SamplingParams(**{**vars(params), "seed": 99}))[0][0].tokens
    fig.update(seeded_repeats=alone == again, seeded_same_in_crowd=alone == crowd, other_seed_differs=alone != other)

    samples = engine.generate([prompts[2]], SamplingParams(max_new_tokens=12, temperature=1.0, seed=5), n=4)[0]
    fig["n_samples"] = len(samples)
    fig["n_samples_distinct"] = len({tuple(c.tokens) for c in samples})
    n_ok = len(samples) == 4 and all(len(c.tokens) == 12 for c in samples) and fig["n_samples_distinct"] > 1

    lp_params = SamplingParams(max_new_tokens=8, temperature=0.7, top_k=5, seed=3, logprobs=True)
    out = engine.generate([prompts[0]], lp_params)[0][0]
    with strict_fp32(), torch.no_grad():
        logits = model(torch.tensor([prompts[0] + out.tokens], device=ctx.device))[0, len(prompts[0]) - 1:-1]
    expected = (logits / 0.7).log_softmax(-1).gather(1, torch.tensor(out.tokens, device=ctx.device)[:, None]).squeeze(1)
    logprobs = torch.tensor(out.logprobs)
    fig["logprobs_finite"] = bool(torch.isfinite(logprobs).all())
    fig["logprobs_max_diff_vs_forward"] = max_diff(logprobs, expected)
    ok = (alone == again == crowd and alone != other and n_ok and fig["logprobs_finite"]
          and fig["logprobs_max_diff_vs_forward"] <= 1e-3)
    fig["summary"] = (f"repeats {alone == again}, crowd {alone == crowd}, other seed differs {alone != other}, "
                      f"n=4 distinct {fig['n_samples_distinct']}, logprobs finite {fig['logprobs_finite']} "
                      f"(diff {fig['logprobs_max_diff_vs_forward']:.1e})")
    return ok


def check_engine_bf16(fig: dict, ctx: Context) -> bool:
    ok = True
    new = 16 if ctx.quick else 32
    for case in ("tiny-v3", "bench-60m"):
        model = greedy_model(case)
        prompts = engine_prompts(ctx.quick, model.config.vocab_size)
        fp32 = greedy_tokens(on(model, ctx.device), prompts, new)
        bf16_model = on(model, ctx.device, torch.bfloat16)
        bf16 = greedy_tokens(bf16_model, prompts, new)
        sampled = Engine(bf16_model, eos_token_ids=[]).generate(
            prompts[:2], SamplingParams(max_new_tokens=8, temperature=1.0, seed=0, logprobs=True))
        logprobs = torch.tensor([lp for c in sampled for lp in c[0].logprobs])
        fig[case] = {"cache_dtype": str(bf16_model.new_cache(1, 1).kv.dtype),
                     "complete": all(len(t) == new for t in bf16), "match_rate_vs_fp32": match_rate(bf16, fp32),
                     "logprobs_finite": bool(torch.isfinite(logprobs).all())}
        ok &= fig[case]["complete"] and fig[case]["logprobs_finite"]
    fig["summary"] = "; ".join(f"{c} tokens vs fp32 {v['match_rate_vs_fp32']:.3f}, logprobs finite "
                               f"{v['logprobs_finite']}" for c, v in fig.items())
    return ok


def build_corpus(ctx: Context) -> tuple[Path, Path]:
    """A tokenizer and token shards of 1-digit arithmetic, built in-process in about a second
    (tests/test_train.py's tiny_corpus)."""
    if ctx.corpus is None:
        from nanoseek.data import get_task, sample
        from nanoseek.data.corpus import build_task_corpus
        from nanoseek.tokenizer import Tokenizer, train_tokenizer

        task = get_task("arithmetic")
        texts = [f"{p.prompt}\n{task.render_solution(p)}" for p in sample(task, "train", 200, 0, 1)]
        tok_dir, data_dir = ctx.work / "corpus" / "tok", ctx.work / "corpus" / "data"
        train_tokenizer(texts, 300).save(tok_dir)
        one_digit = type(task)()
        one_digit.difficulties = [1]
        build_task_corpus(Tokenizer.load(tok_dir), data_dir, [one_digit], 300)
        ctx.corpus = tok_dir, data_dir
    return ctx.corpus


def train_steps(ctx: Context) -> int:
    return 6 if ctx.quick else 40


def train_overrides(ctx: Context, name: str, steps: int, *extra: str) -> list[str]:
    tok_dir, data_dir = build_corpus(ctx)
    overrides = [f"out_dir={ctx.work / 'runs'}", f"name={name}", f"tokenizer={tok_dir}", f"data.path={data_dir}",
                 f"steps={steps}", f"device={ctx.device}",
                 # On CUDA precision=auto is bf16 autocast already; naming it also runs that path on CPU.
                 f"precision={ctx.train_precision}",
                 "optimizer.warmup_steps=5", "progress=false", "tensorboard=false", "analysis_problems=0",
                 f"log_every={max(steps // 4, 1)}", *extra]
    if ctx.quick:
        # Small batches, and a fixed MFU denominator instead of timing bf16 matmuls on a CPU.
        overrides += ["data.seq_len=64", "data.batch_size=4", "peak_flops=1e11"]
    return overrides


def losses(stage: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(stage / "metrics.jsonl")]


def training_figures(stage: Path) -> dict:
    records = read_metrics(stage / "metrics.jsonl")
    loss = [r["loss"] for r in records]
    window = max(1, min(3, len(loss) // 3))  # mean of the first and last few steps (one of three)
    head, tail = loss[:window], loss[-window:]
    rates = [r["tok_per_s"] for r in records[2:]] or [r["tok_per_s"] for r in records]
    return {"steps": len(records), "loss_first": loss[0], "loss_last": loss[-1],
            "loss_head_mean": sum(head) / len(head), "loss_tail_mean": sum(tail) / len(tail), "loss_window": window,
            "loss_decreased": sum(tail) / len(tail) < sum(head) / len(head),
            "finite": all(map(math.isfinite, loss)),
            "tok_per_s_median": statistics.median(rates), "mfu_median": statistics.median(r["mfu"] for r in records),
            "step_s_first": records[0]["step_s"]}


def copy_metrics(ctx: Context, stage: Path, out: Path, name: str) -> None:
    if (stage / "metrics.jsonl").exists():
        shutil.copy2(stage / "metrics.jsonl", out / f"train_{name}_metrics.jsonl")


def check_train(fig: dict, ctx: Context, out: Path) -> bool:
    from nanoseek.train import load_train_config, pretrain

    steps = train_steps(ctx)
    config = load_train_config(PRETRAIN_CONFIG, train_overrides(ctx, "eager", steps, f"save_every={steps // 2}"))
    started = time.perf_counter()
    try:
        final = pretrain(config)
    except Exception as error:  # noqa: BLE001
        # A bf16 autocast failure would hide every other training figure: record it, and train in
        # fp32 so that checkpoints, resume and compile are still exercised on the device.
        fig["bf16_error"] = error_text(error)
        ctx.train_precision = "fp32"
        shutil.rmtree(config.stage_dir, ignore_errors=True)
        config = load_train_config(PRETRAIN_CONFIG, train_overrides(ctx, "eager", steps, f"save_every={steps // 2}"))
        started = time.perf_counter()
        final = pretrain(config)
    sync(ctx.device)
    fig["precision"] = ctx.train_precision
    fig["wall_s"] = time.perf_counter() - started
    stage = final.parent
    copy_metrics(ctx, stage, out, "eager")
    fig.update(training_figures(stage))
    fig["folders"] = sorted(p.name for p in stage.iterdir() if p.is_dir())
    model = load(final, device=ctx.device)
    fig["final_loads_dtype"] = str(model.dtype)
    tokens = Engine(model).generate([[model.config.bos_token_id or 0]], SamplingParams(max_new_tokens=8))[0][0].tokens
    fig["final_generates"] = len(tokens) > 0
    failed = "bf16_error" in fig
    ok = (not failed and fig["finite"] and fig["loss_decreased"] and f"step-{steps // 2}" in fig["folders"]
          and "final" in fig["folders"] and fig["final_generates"])
    fig["summary"] = "bf16 autocast FAILED (see bf16_error), then fp32: " if failed else "bf16 autocast: "
    fig["summary"] += (f"loss {fig['loss_first']:.3f} -> {fig['loss_last']:.3f} in {fig['steps']} steps, "
                       f"{fig['tok_per_s_median']:,.0f} tok/s, MFU {100 * fig['mfu_median']:.1f}%, "
                       f"folders {fig['folders']}")
    return ok


def check_train_resume(fig: dict, ctx: Context, out: Path) -> bool:
    """As after a kill late in the run: final/ removed, --resume starts from the middle checkpoint."""
    from nanoseek.train import load_train_config, pretrain

    steps = train_steps(ctx)
    config = load_train_config(PRETRAIN_CONFIG, train_overrides(ctx, "eager", steps, f"save_every={steps // 2}"))
    stage = config.stage_dir
    before = losses(stage)
    shutil.rmtree(stage / "final")
    pretrain(config, resume=True)
    after = losses(stage)
    copy_metrics(ctx, stage, out, "resumed")
    recomputed = list(range(steps // 2, steps))
    diffs = [abs(after[i] - before[i]) for i in recomputed]
    fig.update(resumed_from=f"step-{steps // 2}", steps_logged=len(after), max_abs_loss_diff=max(diffs),
               bitwise=after == before, final_written=(stage / "final" / "model.safetensors").exists())
    # Bitwise on CPU (tests hold that); on CUDA atomics in index backward reorder float sums, so a
    # small difference is expected and reported.
    ok = len(after) == steps and fig["final_written"] and max(diffs) <= 1e-2 * max(abs(before[-1]), 1.0)
    fig["precision"] = ctx.train_precision
    fig["summary"] = (f"{ctx.train_precision}, from step-{steps // 2}: bitwise {fig['bitwise']}, "
                      f"max |loss diff| {max(diffs):.2e}, final written {fig['final_written']}")
    return ok


def check_engine_compile(fig: dict, ctx: Context) -> bool:
    from torch._dynamo.utils import counters

    ok = True
    new = 12 if ctx.quick else 32
    # bench-60m is the model that matters; the CPU smoke test compiles the tiny one (bench-60m's
    # compilation takes minutes on 2 cores).
    cases = ("tiny-v3",) if ctx.device.type == "cpu" else ("bench-60m",)
    for case in cases:
        counters.clear()
        model = on(greedy_model(case), ctx.device)
        prompts = engine_prompts(ctx.quick, model.config.vocab_size)[:3]
        eager = [greedy_tokens(model, [p], new)[0] for p in prompts]
        engine = Engine(model, eos_token_ids=[], compile=True)
        fig[case] = {"warm_up_s": engine.warm_up()}  # compiles the single-row step; kept if a later call hangs
        compiled = [engine.generate([p], SamplingParams(max_new_tokens=new))[0][0].tokens for p in prompts]
        sync(ctx.device)
        fig[case].update(equal_to_eager=compiled == eager, match_rate=match_rate(compiled, eager), **dynamo_counts())
        ok &= compiled == eager
    fig["summary"] = "; ".join(f"{c} = eager {v['equal_to_eager']} (compile {v['warm_up_s']:.0f}s, "
                               f"{v['unique_graphs']} graphs, {v['graph_breaks']} breaks)" for c, v in fig.items())
    return ok


def check_train_compile(fig: dict, ctx: Context, out: Path) -> bool:
    from torch._dynamo.utils import counters

    from nanoseek.train import load_train_config, pretrain

    counters.clear()
    steps = 3 if ctx.quick else 20
    overrides = train_overrides(ctx, "compiled", steps, "save_every=0", "compile=true")
    config = load_train_config(PRETRAIN_CONFIG, overrides)
    started = time.perf_counter()
    final = pretrain(config)
    sync(ctx.device)
    fig["wall_s"] = time.perf_counter() - started
    copy_metrics(ctx, final.parent, out, "compiled")
    fig.update(training_figures(final.parent))
    fig.update(dynamo_counts())
    # The eager run has the same seed and data, so the same initial weights and batches, and the
    # same learning rates during the warm-up (after it the two cosine schedules differ in length).
    eager = losses(ctx.work / "runs" / "eager" / "pretrain")
    compiled = losses(final.parent)
    if eager:
        rel = [abs(a - b) / abs(b) for a, b in zip(compiled[:5], eager[:5])]
        fig["first_step_rel_diff_vs_eager"], fig["max_rel_diff_vs_eager_warmup"] = rel[0], max(rel)
    # Before any update the two differ only by how kernels are fused and rounded.
    ok = fig["finite"] and fig["loss_decreased"] and fig.get("first_step_rel_diff_vs_eager", 0.0) <= 1e-2
    fig["precision"] = ctx.train_precision
    fig["summary"] = (f"{ctx.train_precision}, loss {fig['loss_first']:.3f} -> {fig['loss_last']:.3f}, first-step "
                      f"rel diff vs eager {fig.get('first_step_rel_diff_vs_eager', float('nan')):.1e}, "
                      f"{fig['tok_per_s_median']:,.0f} tok/s (first step {fig['step_s_first']:.0f}s)")
    return ok


def check_speed_decode(fig: dict, ctx: Context) -> bool:
    from nanoseek.model.checkpoint import save_pretrained

    shapes = [(1, 32, 8), (2, 32, 8)] if ctx.quick else [(1, 512, 64), (8, 512, 64)]
    repeats = 1 if ctx.quick else 2
    folder = str(ctx.work / "bench-peaked")
    save_pretrained(peaked_model(config_of("bench-60m")), folder)
    gen = torch.Generator().manual_seed(0)
    prompts = {batch: torch.randint(2, 8000, (batch, context), generator=gen).to(ctx.device)
               for batch, context, _ in shapes}
    rows, skipped, tokens = {}, [], {}
    # In `fig` from the start: a run stopped by its time limit keeps the rows measured so far.
    fig.update(shapes=[{"batch": b, "context": c, "new_tokens": n} for b, c, n in shapes], repeats=repeats,
               results=rows, skipped_for_budget=skipped, compiled_measured=ctx.compile_speed)

    def timed(key: str, fn, batch: int, n: int, reference: str | None = None) -> None:
        if ctx.over_budget():
            skipped.append(key)
            return
        try:
            result = measure(fn, prompts[batch], n, repeats)
            rows[key] = {k: v for k, v in result.items() if k != "tokens"}
            tokens[key] = result["tokens"].cpu()
            if reference in tokens:
                rows[key]["same_tokens_as_" + reference] = float((tokens[key] == tokens[reference]).float().mean())
        except Exception as error:  # noqa: BLE001 (one configuration failing leaves the others)
            rows[key] = {"error": error_text(error)}

    # Eager figures of every dtype first, compilation (the slow part) last.
    engines = {}
    for dtype in (torch.bfloat16, torch.float32):
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        ours = load(folder, device=ctx.device, dtype=dtype)
        engines[name] = ours
        engine = Engine(ours, eos_token_ids=[])
        for batch, _, n in shapes:
            timed(f"ours_{name}_eager_b{batch}", lambda p, k, e=engine: run_ours(e, p, k), batch, n)
        hf = None
        try:
            hf = load_hf(folder, ctx.device, dtype)
        except Exception as error:  # noqa: BLE001
            rows[f"hf_{name}"] = {"error": error_text(error)}
        if hf is not None:
            for batch, _, n in shapes:
                timed(f"hf_{name}_b{batch}", lambda p, k, m=hf: run_hf(m, p, k), batch, n,
                      f"ours_{name}_eager_b{batch}")
            del hf
    for name, ours in engines.items() if ctx.compile_speed else ():
        # compile=True covers single-row decode only; batch 8 would be the eager figure again. The
        # warm-up (warmup_s) compiles; fp32 may reuse the graphs engine_compile made.
        batch, _, n = shapes[0]
        engine = Engine(ours, eos_token_ids=[], compile=True)
        timed(f"ours_{name}_compile_b{batch}", lambda p, k, e=engine: run_ours(e, p, k), batch, n,
              f"ours_{name}_eager_b{batch}")
    fig["summary"] = ", ".join(f"{k.replace('_eager', '')} {v['decode_tok_s']:,.0f}" for k, v in rows.items()
                               if "decode_tok_s" in v) + " tok/s" + (f"; skipped {len(skipped)}" if skipped else "")
    # Informative: passes when every measured configuration ran.
    return all("error" not in v for v in rows.values())


def time_training(ctx: Context, build: Callable, config: ModelConfig, ids: torch.Tensor, compiled: bool,
                  precision: str, timed_steps: int, flops: float, peak: float) -> dict:
    """benchmarks/train.py's optimizer step (forward, backward, fused AdamW) on the device, under bf16
    autocast or in fp32; the median of the timed steps after one warm-up (two when compiled)."""
    # benchmarks/train.py builds on CPU; Module.to moves the parameters in place, so the optimizer
    # it made still holds them and steps them on the device.
    model, step = build(config, ids)
    model.to(ctx.device)
    if compiled:
        compile_blocks(model)
    times = []
    for _ in range(timed_steps + (2 if compiled else 1)):
        sync(ctx.device)
        started = time.perf_counter()
        bf16 = precision == "bf16"
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            step()
        sync(ctx.device)
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times[-timed_steps:])
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    return {"precision": precision, "step_s": seconds, "tok_per_s": tokens / seconds,
            "mfu_vs_bf16_peak": tokens / seconds * flops / peak, "first_step_s": times[0]}


def check_speed_train(fig: dict, ctx: Context) -> bool:
    batch, seq, timed_steps = (2, 64, 1) if ctx.quick else (8, 512, 5)
    config = config_of("bench-60m").replace(num_nextn_predict_layers=0)
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    ids = ids.to(ctx.device)
    peak = 1e11 if ctx.quick else peak_flops(ctx.device, torch.bfloat16, sizes=(4096,), repeats=3)
    with torch.device("meta"):  # the same architecture, so the same FLOPs per token for both
        flops = flops_per_token(Transformer(config), seq)
    fig.update(batch=batch, seq=seq, timed_steps=timed_steps, bf16_peak_tflops=peak / 1e12, flops_per_token=flops)
    ran = True
    # bf16 autocast is how a GPU trains. If ours fails under it, fp32 figures of both implementations
    # stand in, so the run still compares them. Compilation, the slow part, comes last: the time
    # budget skips it first.
    precisions = ["bf16"]
    for name, build, compiled in (("ours_eager", nanoseek_step, False), ("transformers", transformers_step, False),
                                  ("ours_compile", nanoseek_step, True)):
        for precision in precisions:
            key = name if precision == "bf16" else f"{name}_fp32"
            if ctx.over_budget():
                fig[key] = {"skipped": "time budget"}
                continue
            if compiled and not ctx.compile_speed:
                fig[key] = {"skipped": "compiling bench-60m takes minutes on a CPU (train_compile covers the path)"}
                continue
            if compiled and precision == "bf16" and "error" in fig["ours_eager"]:
                fig[key] = {"skipped": "bf16 autocast failed eagerly"}
                continue
            try:
                fig[key] = time_training(ctx, build, config, ids, compiled, precision, timed_steps, flops, peak)
            except Exception as error:  # noqa: BLE001 (one implementation failing leaves the others)
                fig[key] = {"error": error_text(error)}
                ran = False
                if precision == "bf16" and build is nanoseek_step and "fp32" not in precisions:
                    precisions.append("fp32")  # the loop over `precisions` picks it up at once
    fig["summary"] = ", ".join(f"{k} {v['tok_per_s']:,.0f} tok/s (MFU {100 * v['mfu_vs_bf16_peak']:.1f}%)"
                               for k, v in fig.items() if isinstance(v, dict) and "tok_per_s" in v)
    fig["summary"] += "".join(f"; {k} error" for k, v in fig.items() if isinstance(v, dict) and "error" in v)
    return ran


# ---- running and reporting ---------------------------------------------------------------------------


class CheckTimeout(Exception):
    pass


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "device": str(device), "cpu_threads": torch.get_num_threads(),
           "tf32_defaults": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except Exception as error:  # noqa: BLE001
        env["transformers"] = f"not importable: {error}"
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    try:
        env["nanoseek_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                                text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        env["nanoseek_commit"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                   gpu_memory_gib=props.total_memory / 2**30, cudnn=torch.backends.cudnn.version())
    return env


class Report:
    """Runs each check under an alarm (its own timeout, cut to what is left of the run's hard limit),
    prints its line and rewrites the JSON."""

    def __init__(self, device: torch.device, out: Path, started: float, check_timeout_s: int, limit_s: float):
        self.device, self.out, self.started = device, out, started
        self.check_timeout_s, self.limit_s = check_timeout_s, limit_s
        self.data: dict = {"environment": environment(device), "checks": {}}

    def run(self, name: str, fn: Callable[..., bool], *args) -> None:
        left = int(self.limit_s - (time.perf_counter() - self.started))
        if left < 10:
            self.skip(name, f"the run's limit of {self.limit_s:.0f} s is spent")
            return
        timeout = min(self.check_timeout_s, left)
        fig: dict = {}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        error = None

        def alarm(signum, frame):
            raise CheckTimeout(f"{name} ran past {timeout} s")

        previous = signal.signal(signal.SIGALRM, alarm)
        signal.alarm(timeout)
        try:
            status = "PASS" if fn(fig, *args) else "FAIL"
        except BaseException as caught:  # every failure is data (an alarm, an exit); Ctrl-C still stops the run
            if isinstance(caught, KeyboardInterrupt):
                raise
            status, error = "FAIL", error_text(caught)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        seconds = time.perf_counter() - started
        summary = fig.pop("summary", "")
        entry = {"status": status, "seconds": round(seconds, 2), "summary": summary, "figures": fig}
        if error:
            entry["error"] = error
            summary = (summary + " | " if summary else "") + error.strip().splitlines()[-1][:300]
        if self.device.type == "cuda":
            entry["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.data["checks"][name] = entry
        print(f"{name:<18} {status:<4} {seconds:6.1f}s  {summary}", flush=True)
        self.save()

    def skip(self, name: str, why: str) -> None:
        self.data["checks"][name] = {"status": "SKIP", "seconds": 0.0, "summary": why, "figures": {}}
        print(f"{name:<18} SKIP {0.0:6.1f}s  {why}", flush=True)
        self.save()

    def save(self) -> None:
        self.data["total_s"] = round(time.perf_counter() - self.started, 2)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.data["environment"]["max_memory_allocated_gib_whole_run"] = peak
        (self.out / "cuda_check.json").write_text(json.dumps(self.data, indent=1, default=str) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="folder for cuda_check.json (default: a new temporary folder)")
    parser.add_argument("--quick", action="store_true", help="small shapes and few steps: a smoke test of the script")
    parser.add_argument("--budget-s", type=float, default=180.0,
                        help="after this many seconds of the run, the speed checks skip what is left of them")
    parser.add_argument("--limit-s", type=float, default=270.0,
                        help="hard limit of the whole run: checks are stopped at it, and later ones skipped")
    parser.add_argument("--check-timeout-s", type=int, default=150, help="a check still running after this is stopped")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only these checks (train_resume needs train)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out or tempfile.mkdtemp(prefix="nanoseek-cuda-check-out-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="nanoseek-cuda-check-"))

    if device.type == "cuda" and not torch.cuda.is_available():
        data = {"environment": environment(torch.device("cpu")), "error": "torch.cuda.is_available() is False"}
        (out / "cuda_check.json").write_text(json.dumps(data, indent=1) + "\n")
        print(json.dumps(data))
        raise SystemExit(1)

    report = Report(device, out, started, args.check_timeout_s, args.limit_s)
    env = report.data["environment"]
    print(f"nanoseek CUDA check on {env.get('gpu', device)}: torch {env['torch']} (CUDA {env['torch_cuda']}), "
          f"transformers {env['transformers']}, triton {env['triton']}; output in {out}", flush=True)
    ctx = Context(device, args.quick, work, args.budget_s, started)
    try:
        checks = [("parity_fp32", check_parity_fp32), ("transformers_fp32", check_transformers_fp32),
                  ("bf16", check_bf16), ("grouped_experts", check_grouped_experts), ("absorbed_vs_naive", check_absorbed_vs_naive),
                  ("fused_attention", check_fused_attention),
                  ("engine_greedy", check_engine_greedy), ("engine_sampling", check_engine_sampling),
                  ("engine_bf16", check_engine_bf16), ("train", check_train), ("train_resume", check_train_resume),
                  ("engine_compile", check_engine_compile), ("train_compile", check_train_compile),
                  ("speed_decode", check_speed_decode), ("speed_train", check_speed_train)]
        for name, fn in checks:
            if args.only and name not in args.only:
                continue
            extra = (out,) if name in ("train", "train_resume", "train_compile") else ()
            if name.startswith("speed_") and ctx.over_budget():
                report.skip(name, f"time budget of {args.budget_s:.0f} s spent")
            else:
                report.run(name, fn, ctx, *extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        report.save()
    statuses = [c["status"] for c in report.data["checks"].values()]
    print(f"{statuses.count('PASS')} passed, {statuses.count('FAIL')} failed, {statuses.count('SKIP')} skipped "
          f"in {time.perf_counter() - started:.0f} s; {out / 'cuda_check.json'}", flush=True)
    print(json.dumps(report.data, default=str))
    raise SystemExit(1 if "FAIL" in statuses else 0)


if __name__ == "__main__":
    main()
