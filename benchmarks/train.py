"""Training throughput and MFU of nanoseek against transformers' DeepseekV3, same config, one run.

    python benchmarks/train.py [--config configs/bench-60m.json] [--batch 8] [--seq 512] [--steps 3]
    python benchmarks/train.py --device cuda --dtype bf16 --config configs/bench-1b.json --batch 8 --seq 2048

Protocol: random weights, a batch of random token ids, one optimizer step = forward + backward +
AdamW (the same torch AdamW, fused where supported, for both), fp32 or under bf16 autocast (fp32
master weights, what `precision=auto` trains with on CUDA), MTP and the balance loss off in both. One
warm-up step each (--warmup), then --steps timed steps alternating between the two; medians count.
MFU = tokens/s x FLOPs/token over the peak, FLOPs/token = 6 N_active + 3 L S H (d_qk + d_v)
(N_active without the input embedding, with the output head; causal attention), peak = the larger
median `torch.mm` FLOP/s at 2048^2 and 4096^2 in the run's dtype, measured in this run. The last
output line is one JSON object with every printed figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if __name__ == "__main__" and "OMP_WAIT_POLICY" not in os.environ and os.getloadavg()[0] >= 1:
    # On a shared machine, spinning OpenMP threads stall each other at every barrier whenever another
    # process holds a core. Sleeping waits are chosen only then; both implementations get the same.
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nanoseek.model import ModelConfig, Transformer  # noqa: E402
from nanoseek.train.flops import flops_per_token, peak_flops  # noqa: E402

# Targets by device: on CPU against fp32 peak; on CUDA the speed-up at bf16, MFU reported only.
TARGETS = {"cpu": {"speedup": 1.2, "mfu": 0.65}, "cuda": {"speedup": 1.3, "mfu": 0.0}}


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)


def nanoseek_step(config: ModelConfig, ids: torch.Tensor):
    """Built on ids' device."""
    torch.manual_seed(0)
    model = Transformer(config).to(ids.device).train()
    optimizer = adamw(model)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def step():
        loss = model.compute_loss(inputs, labels, mtp_weight=0.0)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, step


def transformers_step(config: ModelConfig, ids: torch.Tensor):
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.DeepseekV3Config(**{k: v for k, v in config.to_hf_dict().items()
                                                 if k not in ("architectures", "model_type", "rope_scaling")})
    model = transformers.DeepseekV3ForCausalLM(hf_config).to(ids.device).train()
    optimizer = adamw(model)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def step():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "bench-60m.json"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: under bf16 autocast")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ModelConfig.from_file(args.config).replace(num_nextn_predict_layers=0)
    device = torch.device(args.device)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    tokens = args.batch * args.seq
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    precision = torch.autocast(device.type, dtype=dtype, enabled=args.dtype == "bf16")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    peak_2048 = peak_flops(device, dtype, sizes=(2048,))
    peak_4096 = peak_flops(device, dtype, sizes=(4096,), repeats=3)
    peak = max(peak_2048, peak_4096)
    results: dict = {"config": os.path.basename(args.config), "batch": args.batch, "seq": args.seq,
                     "device": str(device), "dtype": args.dtype, "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
                     "peak_gflops_2048": peak_2048 / 1e9, "peak_gflops_4096": peak_4096 / 1e9}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    print(f"{args.dtype} mm peak on {device}: {peak_2048 / 1e9:.1f} GFLOP/s at 2048^2, {peak_4096 / 1e9:.1f} at 4096^2",
          flush=True)

    impls = [("nanoseek", nanoseek_step)] + ([] if args.skip_transformers else [("transformers", transformers_step)])
    built = {name: build(config, ids) for name, build in impls}
    # The same architecture, so the same FLOPs per token for both.
    flops = flops_per_token(built["nanoseek"][0], args.seq)
    times: dict[str, list[float]] = {name: [] for name in built}
    cpu_times: dict[str, list[float]] = {name: [] for name in built}
    for name, (_, step) in built.items():
        for _ in range(args.warmup):  # allocator, thread pool, lazy inits, cuBLAS heuristics
            with precision:
                step()
    # Alternate the implementations step by step, so that load from other processes on a shared
    # machine falls on both alike.
    for _ in range(args.steps):
        for name, (_, step) in built.items():
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            with precision:
                step()
            sync()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    for name in built:
        seconds = statistics.median(times[name])
        results[name] = {"step_s": seconds, "tok_per_s": tokens / seconds, "gflops": tokens / seconds * flops / 1e9,
                         "mfu": tokens / seconds * flops / peak, "flops_per_token": flops,
                         "step_times": times[name], "cpu_s": statistics.median(cpu_times[name]),
                         "cpu_times": cpu_times[name]}
        print(f"{name}: {seconds:.2f} s/step, {tokens / seconds:,.0f} tok/s, MFU {100 * results[name]['mfu']:.1f}%",
              flush=True)

    nano = results["nanoseek"]
    rows = [("implementation", "s/step", "tok/s", "GFLOP/s", "MFU", "CPU s/step")]
    for name, _ in impls:
        r = results[name]
        rows.append((name, f"{r['step_s']:.2f}", f"{r['tok_per_s']:,.0f}", f"{r['gflops']:.1f}", f"{100 * r['mfu']:.1f}%",
                     f"{r['cpu_s']:.2f}"))
    if "transformers" in results:
        results["speedup"] = nano["tok_per_s"] / results["transformers"]["tok_per_s"]
        # CPU seconds per step barely move when other processes take turns on the cores (with
        # passive OpenMP waits), so their ratio is the load-robust second opinion on the speed-up.
        results["speedup_cpu_time"] = results["transformers"]["cpu_s"] / nano["cpu_s"]
    target = TARGETS[device.type]
    results["targets"] = {**target, "speedup_met": results.get("speedup", 0) >= target["speedup"],
                          "mfu_met": nano["mfu"] >= target["mfu"]}
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    if "speedup" in results:
        print(f"nanoseek / transformers tokens/s: {results['speedup']:.2f}x (target >= {target['speedup']}x); "
              f"by CPU time per step: {results['speedup_cpu_time']:.2f}x")
    print(f"nanoseek MFU: {100 * nano['mfu']:.1f}% of the {args.dtype} peak (target >= {100 * target['mfu']:.0f}%)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
