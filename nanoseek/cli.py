"""The `nanoseek` command. Every verb is a typed function: its signature is its argument list and its
docstring its --help. The verb table VERBS is the one place a verb is registered; a test checks that
the parser and the table agree."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
import typing
from collections.abc import Callable
from pathlib import Path

from nanoseek.infer.chat import chat, generate, serve


def info(model_dir: str) -> dict:
    """Parameters (total and active per token), layers by kind, and inference-cache bytes per token."""
    import torch

    from nanoseek.model.checkpoint import load
    from nanoseek.model.moe import MoE

    model = load(model_dir, device="cpu")
    cfg = model.config
    counts = model.num_parameters()
    moe_layers = sum(isinstance(layer.mlp, MoE) for layer in model.layers)
    element_bytes = torch.finfo(model.dtype).bits // 8
    report = {
        "model_type": cfg.model_type,
        "parameters_total": counts["total"],
        "parameters_active_per_token": counts["active"],
        "parameters_mtp": counts["mtp"],
        "layers": {"dense": cfg.num_hidden_layers - moe_layers, "moe": moe_layers, "mtp": len(model.mtp)},
        "experts": {"routed": cfg.n_routed_experts or 0, "shared": cfg.n_shared_experts or 0,
                    "per_token": cfg.num_experts_per_tok if cfg.has_moe else 0},
        "cache_elements_per_token": cfg.cache_dim * cfg.num_hidden_layers,
        "cache_bytes_per_token": cfg.cache_dim * cfg.num_hidden_layers * element_bytes,
        "cache_dtype": str(model.dtype).removeprefix("torch."),
        "context": cfg.max_position_embeddings,
    }
    print(f"{cfg.model_type}: {counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active per token"
          f" (+{counts['mtp'] / 1e6:.2f}M MTP)")
    print(f"layers: {report['layers']['dense']} dense, {moe_layers} MoE, {len(model.mtp)} MTP; experts: "
          f"{report['experts']['routed']} routed (top-{report['experts']['per_token']}) + "
          f"{report['experts']['shared']} shared")
    print(f"cache: {report['cache_elements_per_token']} elements = {report['cache_bytes_per_token']} bytes per token "
          f"({report['cache_dtype']}: {cfg.kv_lora_rank} latent + {cfg.qk_rope_head_dim} rope, x {cfg.num_hidden_layers} layers)")
    print(json.dumps(report))
    return report


def demo(out_dir: str = "runs/demo", max_new_tokens: int = 16, seed: int = 0) -> list[int]:
    """Build a randomly initialised tiny DeepSeek-V3 model, save it in the Hugging Face layout, load it
    back, and greedily generate from it (a smoke test of the whole model path)."""
    import torch

    from nanoseek.generate import generate
    from nanoseek.model import ModelConfig, Transformer
    from nanoseek.model.checkpoint import load

    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                         num_hidden_layers=4, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32,
                         qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=8,
                         num_experts_per_tok=2, n_group=2, topk_group=1, num_nextn_predict_layers=1)
    Transformer(config).save_pretrained(out_dir)
    model = load(out_dir)
    tokens = generate(model, [[1, 2, 3, 4]], max_new_tokens=max_new_tokens)[0]
    print(f"saved a random {model.num_parameters()['total'] / 1e6:.2f}M-parameter model to {out_dir}; "
          f"greedy continuation of [1, 2, 3, 4]: {tokens}")
    return tokens


def pretrain(overrides: list[str], config: str | None = None, resume: bool = False) -> str:
    """Pretrain a model from a YAML config (configs/*.yaml) with key=value overrides, e.g.
    `nanoseek pretrain --config configs/pretrain-tiny.yaml steps=100 optimizer.lr=1e-3`. Writes
    runs/NAME/pretrain/{step-N,final}/ (Hugging Face layout), metrics.jsonl and plots; --resume
    continues from the newest step checkpoint exactly as if the run had never stopped."""
    from nanoseek.train import load_train_config
    from nanoseek.train import pretrain as run

    return str(run(load_train_config(config, overrides), resume=resume))


def pipeline(overrides: list[str], config: str | None = None, preset: str = "default", force: str = "") -> str:
    """The main job, no arguments needed: the DeepSeek-R1 recipe on the built-in tasks. Trains a
    tokenizer, pretrains a small MoE base model, cold-start SFT, GRPO and its two control arms (more
    SFT; R1-Zero GRPO from the base), rejection sampling, a second SFT and GRPO round, and two
    students (distilled from the teacher; their own SFT and GRPO), evaluates every stage on held-out
    problems and writes runs/NAME/report.md. Stages already done are skipped, so running it again resumes.
    --preset smoke runs every stage in a few minutes. Overrides: key=value (configs/pipeline.yaml).
    A stage done earlier with other settings stops the run; --force STAGE redoes it and every stage after it."""
    from nanoseek.pipeline import load_pipeline_config, run_pipeline

    return str(run_pipeline(load_pipeline_config(config, overrides, preset), force=force))


def sft(overrides: list[str], config: str | None = None, resume: bool = False) -> str:
    """Supervised fine-tuning (R1 cold start) of a model folder on a JSONL file of {"messages": [...]}
    conversations, loss on assistant tokens only, e.g. `nanoseek sft init=runs/x/pretrain/final
    data.path=convs.jsonl steps=100 name=x`. Writes runs/NAME/sft/{step-N,final}/, metrics.jsonl
    and plots; --resume continues from the newest step checkpoint."""
    from nanoseek.train.sft import load_sft_config
    from nanoseek.train.sft import sft as run

    return str(run(load_sft_config(config, overrides), resume=resume))


def grpo(overrides: list[str], config: str | None = None, resume: bool = False, zero: bool = False) -> str:
    """GRPO with rule rewards from a model folder on train-split prompts of the built-in tasks, e.g.
    `nanoseek grpo init=runs/x/sft/final "tasks={arithmetic: [2, 3]}" steps=40 name=x`. --zero is
    R1-Zero: RL straight from a base model with the R1-Zero prompt. Writes runs/NAME/grpo/final/,
    metrics.jsonl (rewards, accuracy, format, clipping, KL, lengths, phase seconds), samples and
    RL curves; --resume continues exactly from the newest step checkpoint."""
    from nanoseek.train.grpo import grpo as run
    from nanoseek.train.grpo import load_grpo_config

    return str(run(load_grpo_config(config, [*overrides, *(["zero=true"] if zero else [])]), resume=resume))


def eval(model_dir: str, tasks: str = "arithmetic:2,3", problems: int = 0, samples: int = 8,  # noqa: A001
         temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int = 256, greedy: bool = True, seed: int = 0,
         template: str = "chat", out: str = "", lengths: str = "", depths: str = "0,25,50,75,100") -> dict:
    """Evaluate a model folder on held-out (eval-split) problems with R1's protocol: pass@1 over
    `samples` samples at T=0.6, top-p 0.95, unbiased pass@k, maj@k, greedy accuracy, strict and
    lenient scoring, format rate, mean tokens, truncation; per task and difficulty with standard
    errors. `tasks` is "name:d1,d2;name2:d3"; `problems` per task difficulty (0: 500). Prints a table
    and writes JSON (default MODEL_DIR/eval.json). With --lengths, e.g. `--task passkey --lengths 1k,2k
    --depths 0,25,50,75,100`: greedy passkey retrieval accuracy per prompt length in tokens and key
    depth in %, `problems` keys per cell (0: 20), as a table, JSON (default MODEL_DIR/passkey.json)
    and a heatmap PNG beside it."""
    import torch

    from nanoseek.eval import (EvalConfig, eval_suites, evaluate, format_passkey_table, format_table, parse_depths,
                               parse_lengths, parse_tasks, passkey_eval, plot_passkey_heatmap)
    from nanoseek.model.checkpoint import load
    from nanoseek.tokenizer import Tokenizer

    if lengths:
        if tasks != "passkey":
            raise ValueError(f"--lengths is the passkey grid: pass --task passkey, not {tasks!r}")
        grid_lengths, grid_depths = parse_lengths(lengths), parse_depths(depths)
        model = load(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
        results = passkey_eval(model, Tokenizer.load(model_dir), grid_lengths, grid_depths, problems or 20, seed)
        print(format_passkey_table(results))
        path = Path(out or Path(model_dir) / "passkey.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
        plot_passkey_heatmap(results, str(path.with_suffix(".png")))
        print(f"wrote {path} and {path.with_suffix('.png')}")
        return results
    config = EvalConfig(samples=samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                        greedy=greedy, seed=seed, template=template)
    suites = eval_suites(parse_tasks(tasks), problems or 500, seed)
    model = load(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    results = evaluate(model, Tokenizer.load(model_dir), suites, config)
    print(format_table(results))
    path = Path(out or Path(model_dir) / "eval.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return results


def sample(model_dir: str, overrides: list[str], out: str = "", config: str | None = None) -> str:
    """Rejection sampling (R1 stage 3): k samples per train-split problem from a model folder at
    T=0.6, top-p 0.95; keeps the correct ones in the strict R1 format and drops truncated, repetitive
    and duplicate ones, e.g. `nanoseek sample runs/x/grpo/final "tasks={arithmetic: [2, 3]}" problems=200
    samples=8 keep_per_prompt=2 --out runs/x/samples` (overrides right after MODEL_DIR). Writes
    OUT/samples.jsonl (`nanoseek sft` conversations; default OUT: MODEL_DIR/samples) and OUT/stats.json
    (acceptance per task and difficulty, rejections by reason) and prints a table."""
    from nanoseek.train.sample import load_sample_config
    from nanoseek.train.sample import sample as run

    settings = load_sample_config(config, overrides)
    # Set, not passed as overrides: a path is not a YAML scalar ("null", "123" and "a: b" are not strings).
    settings.model, settings.out_dir = model_dir, out or settings.out_dir
    return str(run(settings))


def distill(teacher: str, student: str, overrides: list[str], config: str | None = None, resume: bool = False) -> str:
    """Distil TEACHER (a model folder) into STUDENT: a model folder to start from, or a JSON/YAML model
    config for a fresh, smaller MoE or dense model. mode=sequence (R1's distillation) is SFT on the
    teacher's verified samples at data.path and works across tokenizers; mode=logit matches the
    teacher's next-token distributions on completion tokens (generalised JSD: beta=0 forward KL,
    1 reverse KL; temperature; lmbda = fraction of batches sampled on-policy by the student), e.g.
    `nanoseek distill runs/x/grpo/final student.json mode=logit data.path=samples.jsonl steps=200 name=x`.
    Writes runs/NAME/distill/{step-N,final}/, metrics.jsonl and plots; --resume continues exactly."""
    from nanoseek.train.distill import distill as run
    from nanoseek.train.distill import load_distill_config

    return str(run(load_distill_config(config, overrides, teacher, student), resume=resume))


def extend(model_dir: str, overrides: list[str], factor: float = 4.0, seq_len: int = 0, method: str = "yarn",
           config: str | None = None, resume: bool = False) -> str:
    """Extend a model folder's context by --factor: write the RoPE scaling (--method yarn, pi = linear
    position interpolation, ntk = an NTK-aware rope_theta, or none = the baseline without scaling;
    all load in transformers) and max_position_embeddings = original x factor into its config, then fine-tune on passkey documents
    of --seq-len tokens (default: the whole new context), e.g. `nanoseek extend runs/x/sft/final
    steps=200 name=x --factor 4 --seq-len 2048` (overrides right after MODEL_DIR). Writes
    runs/NAME/extend/{scaled,step-N,final}/, metrics.jsonl and plots; --resume continues exactly."""
    from nanoseek.model.config import ModelConfig
    from nanoseek.train.extend import extend as run
    from nanoseek.train.extend import load_extend_config, scaled_config

    # Set, not passed as overrides: a path is not a YAML scalar. `replace` validates the result.
    settings = dataclasses.replace(load_extend_config(config, overrides), init=model_dir, factor=factor, method=method)
    seq_len = seq_len or scaled_config(ModelConfig.from_file(model_dir), method, factor).max_position_embeddings
    settings = dataclasses.replace(settings, data=dataclasses.replace(settings.data, seq_len=seq_len))
    return str(run(settings, resume=resume))


VERBS: dict[str, Callable] = {
    "info": info,
    "demo": demo,
    "generate": generate,
    "chat": chat,
    "serve": serve,
    "pretrain": pretrain,
    "pipeline": pipeline,
    "sft": sft,
    "grpo": grpo,
    "eval": eval,
    "sample": sample,
    "distill": distill,
    "extend": extend,
}


def _add_arguments(parser: argparse.ArgumentParser, fn: Callable) -> None:
    hints = typing.get_type_hints(fn)
    for name, param in inspect.signature(fn).parameters.items():
        kind = hints.get(name, str)
        origin = typing.get_origin(kind)
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
            origin = typing.get_origin(kind)
        flag = name.replace("_", "-")
        if param.default is inspect.Parameter.empty and origin is list:
            parser.add_argument(name, type=typing.get_args(kind)[0], nargs="*", metavar=name.upper())
        elif param.default is inspect.Parameter.empty:
            parser.add_argument(name, type=kind)
        elif kind is bool:
            parser.add_argument(f"--{flag}", dest=name, action=argparse.BooleanOptionalAction, default=param.default)
        elif origin is list:
            parser.add_argument(f"--{flag}", dest=name, type=typing.get_args(kind)[0], nargs="*", default=param.default)
        else:
            parser.add_argument(f"--{flag}", dest=name, type=kind, default=param.default,
                                help=f"(default: {param.default})")


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring on one line, for `nanoseek --help`'s list of verbs (a
    docstring's first line usually ends mid-sentence). A sentence ends at . ! or ? before a space,
    except in "e.g." and "i.e."."""
    text = " ".join(doc.split())
    end = re.search(r"(?<!\be\.g)(?<!\bi\.e)[.!?](?=\s)", text)
    return text[:end.end()] if end else text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description=first_sentence(__doc__))
    verbs = parser.add_subparsers(dest="verb", required=True)
    for name, fn in VERBS.items():
        doc = inspect.getdoc(fn) or ""
        sub = verbs.add_parser(name, help=first_sentence(doc), description=doc)
        _add_arguments(sub, fn)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    verb = VERBS[args.pop("verb")]
    try:
        verb(**args)
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"nanoseek: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
