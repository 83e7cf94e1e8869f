"""Long prompts on this CPU: peak memory, prefill time and decode speed of the nanoseek engine at
8K, 32K and 128K tokens, against transformers on the same weights, and the passkey it retrieves.

    python benchmarks/long_context.py [--model runs/passkey/extend-yarn/extend/final] [--lengths 8k,32k,128k]

Protocol: the prompt of each length is a passkey prompt (data/passkey.py) of exactly that many
tokens, the key at 50% depth; the filler after the key is cut at a character (as Landmark Attention
cuts it) so the count is exact. nanoseek prefills it in chunks of --chunk tokens (the first in naive
form, later ones against the cached prefix, model/attention.py) and then decodes --decode tokens
greedily, EOS off (the key is the first number of those tokens). transformers loads the same folder (its default sdpa attention) and does the
same with its own cache. Each (implementation, length) runs in a fresh process, so its peak
resident memory (ru_maxrss) is its own; transformers' process runs under an address-space limit
(RLIMIT_AS, --hf-mem-gib) and a time limit (--hf-timeout), and once it fails at a length the longer
ones are not tried. Decode tok/s = (n - 1) / (t_n - t_1), t_k when decode step k ended. Without --model the benchmark builds
the passkey model's config (configs/pretrain-passkey.yaml, YaRN-scaled by 640 as the experiment
extends it) with random weights: every figure but the retrieved key still holds.

It also prints the inference cache of the full DeepSeek-V3 config at 128K tokens in bf16: MLA's
latent rows (kv_lora_rank + qk_rope_head_dim per layer) against the per-head keys and values a
standard multi-head cache would hold. The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nanoseek.data.passkey import FILLER, Passkey, repetitions_for  # noqa: E402
from nanoseek.eval import parse_lengths  # noqa: E402
from nanoseek.model import ModelConfig  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402

GIB = 1 << 30
# DeepSeek-V3 671B (docs/facts.md §1): only the fields that size the attention cache matter here.
V3 = dict(vocab_size=129280, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
          kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
          num_experts_per_tok=8, n_group=8, topk_group=4, max_position_embeddings=163840)
FIRST_NUMBER = re.compile(r"[0-9]+")


def cache_bytes(config: ModelConfig, tokens: int, bytes_per_element: int = 2) -> dict[str, int]:
    """MLA's cache (the latent and the shared rope key per layer) and a standard multi-head cache
    (every head's full key and value per layer) for `tokens` tokens."""
    layers = config.num_hidden_layers
    standard = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    return {"latent": tokens * layers * config.cache_dim * bytes_per_element,
            "multi_head": tokens * layers * standard * bytes_per_element}


def passkey_prompt(tokenizer: Tokenizer, length: int, seed: int = 0, depth: float = 50) -> tuple[list[int], str]:
    """Token ids of a passkey prompt of exactly `length` tokens (BOS included) and its key: the most
    whole filler repetitions that fit, then the filler after the key lengthened by the shortest
    prefix of one more repetition that reaches the count."""
    count = lambda text: len(tokenizer.encode(text)) + 1
    problem = Passkey().problem_at(repetitions_for(length, count), depth, seed)
    body, question = problem.prompt.rsplit("\n", 1)
    extra = " " + " ".join([FILLER] * 2)  # a merge at the join may take a character or two more
    with_extra = lambda chars: f"{body}{extra[:chars]}\n{question}"
    low, high = 0, len(extra)  # the fewest extra characters whose prompt has >= length tokens
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if count(with_extra(middle)) < length else (low, middle)
    ids = [tokenizer.bos_id] + tokenizer.encode(with_extra(low))
    if len(ids) != length:
        raise ValueError(f"no passkey prompt of exactly {length} tokens (closest: {len(ids)})")
    return ids, problem.answer


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def run_ours(model_dir: str, length: int, decode: int, chunk: int) -> dict:
    from nanoseek.infer import Engine
    from nanoseek.model.checkpoint import load

    model = load(model_dir, device="cpu", dtype=torch.float32).eval()
    tokenizer = Tokenizer.load(model_dir)
    ids, key = passkey_prompt(tokenizer, length)
    engine = Engine(model, eos_token_ids=[], prefill_chunk=chunk)
    started = time.perf_counter()
    cache, logits, _ = engine.prefill([ids], capacity=length + decode)
    prefill_s = time.perf_counter() - started
    tokens, times = [], []
    with torch.inference_mode():
        for _ in range(decode):
            tokens.append(int(logits[0].argmax()))
            logits = engine.decode_forward(torch.tensor([[tokens[-1]]]), cache)[:, -1]
            times.append(time.perf_counter())
    return result(tokenizer, key, tokens, prefill_s, times, length)


def hf_loadable(model_dir: str, directory: str) -> str:
    """`model_dir` as transformers reads it. Its DeepseekV3Config insists on expert counts even when
    no layer has experts, so a dense model (n_routed_experts null) gets placeholder counts with
    first_k_dense_replace = every layer: the same all-dense computation, the weights linked as they are."""
    config = json.load(open(os.path.join(model_dir, "config.json")))
    if config.get("n_routed_experts"):
        return model_dir
    config.update(n_routed_experts=1, n_shared_experts=1, num_experts_per_tok=1,
                  first_k_dense_replace=config["num_hidden_layers"])
    for name in os.listdir(model_dir):
        if name != "config.json":
            os.symlink(os.path.join(os.path.abspath(model_dir), name), os.path.join(directory, name))
    json.dump(config, open(os.path.join(directory, "config.json"), "w"))
    return directory


def run_hf(model_dir: str, length: int, decode: int) -> dict:
    import transformers

    with tempfile.TemporaryDirectory() as scratch:
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_loadable(model_dir, scratch),
                                                                  dtype=torch.float32).eval()
    tokenizer = Tokenizer.load(model_dir)
    ids, key = passkey_prompt(tokenizer, length)
    tokens = []
    with torch.inference_mode():
        started = time.perf_counter()
        out = model(torch.tensor([ids]), use_cache=True)
        prefill_s = time.perf_counter() - started
        times = []
        for _ in range(decode):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            times.append(time.perf_counter())
    return result(tokenizer, key, tokens, prefill_s, times, length)


def result(tokenizer: Tokenizer, key: str, tokens: list[int], prefill_s: float, times: list[float],
           length: int) -> dict:
    """`times`: when each decode step ended. The first step (one-off costs: packing weights, growing a
    cache) is left out of the rate, as in benchmarks/decode.py."""
    text = tokenizer.decode(tokens)
    number = FIRST_NUMBER.search(text)
    return {"length": length, "ok": True, "prefill_s": prefill_s,
            "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]),
            "peak_rss_bytes": peak_rss(), "key": key, "retrieved": number is not None and number.group(0) == key,
            "completion": text}


def in_subprocess(kind: str, args: argparse.Namespace, length: int, limit_bytes: int | None = None,
                  timeout: float | None = None) -> dict:
    """One measurement in a fresh interpreter: its own peak RSS, and limits that end only it."""
    def limit() -> None:
        if limit_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    command = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--model", args.model,
               "--lengths", str(length), "--decode", str(args.decode), "--chunk", str(args.chunk)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return {"length": length, "ok": False, "error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return {"length": length, "ok": False, "error": last[-300:], "wall_s": time.perf_counter() - started}
    return json.loads(done.stdout.strip().splitlines()[-1])


def default_model(directory: str) -> str:
    """The passkey model's config, YaRN-scaled as the experiment scales it, random weights, and a
    passkey tokenizer fitted here: a stand-in with the right shapes when no trained folder is given."""
    import yaml

    from nanoseek.data import get_task
    from nanoseek.model import Transformer
    from nanoseek.tokenizer import train_tokenizer
    from nanoseek.train.extend import scaled_config

    task = get_task("passkey")
    tokenizer = train_tokenizer([f"{p.prompt} {p.answer}." for p in (task.generate(s, 1) for s in range(300))], 320)
    fields = yaml.safe_load(open(os.path.join(ROOT, "configs", "pretrain-passkey.yaml")))["model"]
    config = ModelConfig.from_hf_dict({**fields, "vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.bos_id,
                                       "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id})
    torch.manual_seed(0)
    model = Transformer(scaled_config(config, "yarn", 640.0))
    model.init_weights()
    model.save_pretrained(directory)
    tokenizer.save(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="a model folder (default: the passkey config, random weights)")
    parser.add_argument("--lengths", default="8k,32k,128k")
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=2048, help="prefill chunk in tokens")
    parser.add_argument("--hf-mem-gib", type=float, default=12.0, help="transformers' address-space limit")
    parser.add_argument("--hf-timeout", type=float, default=900.0, help="seconds per transformers length")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    lengths = parse_lengths(args.lengths)
    if args.worker:
        run = run_ours(args.model, lengths[0], args.decode, args.chunk) if args.worker == "ours" else \
            run_hf(args.model, lengths[0], args.decode)
        print(json.dumps(run))
        return

    with tempfile.TemporaryDirectory() as scratch:
        args.model = args.model or default_model(scratch)
        context = ModelConfig.from_file(os.path.join(args.model, "config.json")).max_position_embeddings
        if max(lengths) + args.decode > context:
            raise SystemExit(f"{max(lengths)} + {args.decode} tokens exceed the model's context of {context}")
        ours, hf = [], []
        for length in lengths:
            ours.append(in_subprocess("ours", args, length))
            print(f"nanoseek     {describe(ours[-1])}", flush=True)
        for length in ([] if args.no_hf else lengths):
            hf.append(in_subprocess("hf", args, length, int(args.hf_mem_gib * GIB), args.hf_timeout))
            print(f"transformers {describe(hf[-1])}", flush=True)
            if not hf[-1]["ok"]:
                break  # a longer prompt needs more memory and time still

    v3 = ModelConfig(**V3)
    v3_cache = cache_bytes(v3, 131072)
    print(f"DeepSeek-V3 cache at 128K tokens, bf16: latent {v3_cache['latent'] / GIB:.2f} GiB "
          f"({v3.cache_dim} elements/layer/token) vs multi-head {v3_cache['multi_head'] / GIB:.1f} GiB "
          f"({v3.num_attention_heads * (v3.qk_head_dim + v3.v_head_dim)}), "
          f"{v3_cache['multi_head'] / v3_cache['latent']:.1f}x smaller")
    print(json.dumps({"model": args.model, "chunk": args.chunk, "decode_tokens": args.decode, "threads": torch.get_num_threads(),
                      "hf_mem_gib": args.hf_mem_gib, "hf_timeout_s": args.hf_timeout, "nanoseek": ours,
                      "transformers": hf, "deepseek_v3_cache_128k_bf16": v3_cache}))


def describe(run: dict) -> str:
    if not run["ok"]:
        return f"{run['length']:>7} tokens: FAILED ({run['error']})"
    return (f"{run['length']:>7} tokens: peak RSS {run['peak_rss_bytes'] / GIB:5.2f} GiB | prefill {run['prefill_s']:8.1f} s | "
            f"decode {run['decode_tok_s']:6.1f} tok/s | key {run['key']} {'retrieved' if run['retrieved'] else 'MISSED'} "
            f"({run['completion'][:24]!r})")


if __name__ == "__main__":
    main()
