"""GRPO step time of nanoseek against TRL's GRPOTrainer, same model, same rewards, same CPU, one run.

    python benchmarks/grpo.py [--prompts 8] [--group-size 8] [--max-new-tokens 64] [--steps 3] [--threads 2]
                              [--model-dir DIR]

Protocol: one model folder, loaded by both: nanoseek through `model.checkpoint.load`, TRL through
`AutoModelForCausalLM.from_pretrained` (DeepseekV3ForCausalLM) and `AutoTokenizer` (the folder's chat
template). Without --model-dir it is a random model of the pipeline's default pretraining size with a
512-token BPE trained in-process on arithmetic problems; a random model rarely emits EOS, so nearly every
completion runs to the budget on both sides. One step = P prompts x G samples of up to L tokens at
temperature 1 (top-p 1, no top-k), the rule rewards accuracy + 0.5 format + 0.25 tag_count, group-scaled
advantages, one update on the DAPO loss (clip 0.2 / 0.28, beta 0, one iteration, all P*G rows in one
micro-batch), AdamW lr 1e-4, betas (0.9, 0.99), no weight decay, constant lr, gradient clip 1, fp32.
Both draw the same prompts at each step (`grpo.draw_prompts`); TRL's reward functions call the same
`nanoseek.train.rewards` functions on its completion ids, decoded by the same tokenizer.

TRL runs its own `trainer.train()` for 1 + --steps steps. A callback runs the nanoseek step right after
each TRL step ends, so the two alternate step by step and load from other processes falls on both
alike; the first step of each is a warm-up. A TRL step is timed from the end of the previous nanoseek
step to its own `on_step_end`, so its data loading and loop overhead count. Phases, timed by wrapping
each trainer's own methods on the instance: generate (nanoseek `_generate`, TRL `_generate`: prompt
tokenization, sampling, decoding), reward (nanoseek `_batch`: rewards, advantages and batch assembly;
TRL `_calculate_rewards`), update (nanoseek `update`; TRL from `on_step_begin` to `on_step_end` less
`_generate_and_score_completions`: the loss forward, backward, clip and optimizer step) and other (the
rest of the step). Rollout tok/s = completion tokens sampled / generate seconds. Medians over the
measured steps count. The last output line is one JSON object with every printed figure.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

if __name__ == "__main__" and "OMP_WAIT_POLICY" not in os.environ and os.getloadavg()[0] >= 1:
    # On a shared machine, spinning OpenMP threads stall each other at every barrier whenever another
    # process holds a core. Sleeping waits are chosen only then; both implementations get the same.
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nanoseek.data import get_task, sample  # noqa: E402
from nanoseek.data.task import prompt_ids  # noqa: E402
from nanoseek.model import ModelConfig, Transformer  # noqa: E402
from nanoseek.model.checkpoint import load  # noqa: E402
from nanoseek.pipeline import PipelineConfig  # noqa: E402
from nanoseek.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from nanoseek.train import grpo  # noqa: E402
from nanoseek.train.rewards import REWARD_FUNCTIONS, Rollout  # noqa: E402

TARGET_SPEEDUP = 3.0
TASKS = {"arithmetic": [2]}
PHASES = ("generate", "reward", "update", "other")


def build_model(folder: str, seed: int = 0) -> None:
    """A random model of the pipeline's default pretraining size and its tokenizer, saved in `folder`."""
    pipeline = PipelineConfig()
    task = get_task("arithmetic")
    problems = [p for d in pipeline.tasks["arithmetic"] for p in sample(task, "train", 100, seed, d)]
    tokenizer = train_tokenizer([text for p in problems for text in (p.prompt, task.render_solution(p))],
                                pipeline.tokenizer_vocab_size)
    config = ModelConfig(**pipeline.pretrain.model, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                         eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    torch.manual_seed(seed)
    Transformer(config).save_pretrained(folder)
    tokenizer.save(folder)


class Phases:
    """Seconds spent in wrapped methods, and the completion tokens they returned, since the last take()."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.tokens = 0

    def wrap(self, obj, method: str, name: str, count=None) -> None:
        inner = getattr(obj, method)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            if count is not None:
                self.tokens += count(out)
            return out

        setattr(obj, method, timed)  # an instance attribute shadows the class's method for this object only

    def take(self) -> tuple[dict[str, float], int]:
        taken = (self.seconds, self.tokens)
        self.seconds, self.tokens = {}, 0
        return taken


def nanoseek_trainer(folder: str, config: grpo.GRPOConfig) -> tuple[grpo.GRPOTrainer, Phases]:
    model = load(folder, device="cpu", dtype=torch.float32)
    trainer = grpo.GRPOTrainer(config, model, Tokenizer.load(folder))
    phases = Phases()
    phases.wrap(trainer, "_generate", "generate", lambda groups: sum(len(c.tokens) for g in groups for c in g))
    phases.wrap(trainer, "_batch", "reward")
    phases.wrap(trainer, "update", "update")
    return trainer, phases


def nanoseek_step(trainer: grpo.GRPOTrainer, phases: Phases, step: int) -> dict:
    start, cpu_start = time.perf_counter(), time.process_time()
    record = trainer.step(step)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    spent, tokens = phases.take()
    samples = trainer.config.prompts * trainer.config.group_size
    return {"step_s": seconds, "cpu_s": cpu, "tokens": tokens, "samples": samples,
            "mean_reward": record["reward"], "rollout_tok_per_s_own": record["rollout_tok_per_s"],
            **{name: spent.get(name, 0.0) for name in PHASES[:3]},
            "other": seconds - sum(spent.get(name, 0.0) for name in PHASES[:3])}


def trl_trainer(folder: str, args, config: grpo.GRPOConfig, output_dir: str, on_step):
    """TRL's GRPOTrainer set up like `config`, over the prompts nanoseek draws at steps 0..steps, in order;
    `on_step(step, record)` is called at the end of each of its steps."""
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # TRL's config sets the deprecated `gradient_checkpointing` alias; passing False to turn it off warns.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
    tokenizer = Tokenizer.load(folder)
    task = copy.copy(get_task("arithmetic"))
    task.difficulties = TASKS["arithmetic"]
    problems = [pair for step in range(args.steps + 1)
                for pair in grpo.draw_prompts([task], config.seed, step, args.prompts)]

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    for task_, problem in problems[:2]:
        rendered = hf_tokenizer.apply_chat_template([{"role": "user", "content": problem.prompt}], tokenize=False,
                                                    add_generation_prompt=True)
        assert hf_tokenizer(rendered, add_special_tokens=False)["input_ids"] == prompt_ids(tokenizer, task_, problem), \
            "the chat template and nanoseek render different prompts"

    @functools.lru_cache(maxsize=4 * args.prompts * args.group_size)
    def rollout(index: int, ids: tuple[int, ...]) -> Rollout:
        stopped = bool(ids) and ids[-1] == tokenizer.eos_id
        task_, problem = problems[index]
        return Rollout(task=task_, problem=problem, text=tokenizer.decode(ids[:-1] if stopped else ids),
                       num_tokens=len(ids), truncated=not stopped, max_tokens=config.max_new_tokens)

    def reward_function(name: str):
        function = REWARD_FUNCTIONS[name]

        def reward(prompts, completions, completion_ids, problem, **kwargs) -> list[float]:
            return [function(rollout(index, tuple(ids))) for index, ids in zip(problem, completion_ids)]

        reward.__name__ = name
        return reward

    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p.prompt}], "problem": i}
                                 for i, (_, p) in enumerate(problems)])
    optimizer = config.optimizer
    trl_config = GRPOConfig(
        output_dir=output_dir, max_steps=args.steps + 1, per_device_train_batch_size=args.prompts * args.group_size,
        gradient_accumulation_steps=1, num_generations=args.group_size, max_completion_length=config.max_new_tokens,
        temperature=config.temperature, top_p=config.top_p, top_k=0, beta=config.beta, num_iterations=config.iterations,
        loss_type=config.loss_type, scale_rewards=config.scale_rewards, epsilon=config.epsilon_low,
        epsilon_high=config.epsilon_high, mask_truncated_completions=config.mask_truncated,
        reward_weights=[config.rewards[name] for name in config.rewards],
        learning_rate=optimizer.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=optimizer.weight_decay,
        adam_beta1=optimizer.betas[0], adam_beta2=optimizer.betas[1], adam_epsilon=optimizer.eps,
        max_grad_norm=optimizer.grad_clip, optim="adamw_torch_fused",
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, shuffle_dataset=False, seed=config.seed,
        report_to="none", logging_strategy="no", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    phases = Phases()

    class Timer(transformers.TrainerCallback):
        """Times each TRL step from the end of the last call to `on_step` to its own end."""

        def on_train_begin(self, *_, **__):
            self.mark, self.cpu_mark = time.perf_counter(), time.process_time()

        def on_step_begin(self, *_, **__):
            self.begin = time.perf_counter()

        def on_step_end(self, cb_args, state, control, **__):
            end, cpu = time.perf_counter(), time.process_time() - self.cpu_mark
            spent, tokens = phases.take()
            seconds = end - self.mark
            scored = spent.get("generate_and_score", 0.0)
            record = {"step_s": seconds, "cpu_s": cpu, "tokens": tokens, "samples": args.prompts * args.group_size,
                      "generate": spent.get("generate", 0.0), "reward": spent.get("reward", 0.0),
                      "update": end - self.begin - scored, "threads": torch.get_num_threads()}
            record["other"] = seconds - record["generate"] - record["reward"] - record["update"]
            on_step(state.global_step - 1, record)
            self.mark, self.cpu_mark = time.perf_counter(), time.process_time()

    trainer = GRPOTrainer(model=model, reward_funcs=[reward_function(name) for name in config.rewards], args=trl_config,
                          train_dataset=dataset, processing_class=hf_tokenizer, callbacks=[Timer()])
    trainer.remove_callback(transformers.PrinterCallback)  # its end-of-training summary line is noise here
    assert not trainer.args.activation_checkpointing, "TRL would recompute activations; nanoseek does not"
    phases.wrap(trainer, "_generate", "generate", lambda out: sum(len(ids) for ids in out[1]))
    phases.wrap(trainer, "_calculate_rewards", "reward")
    phases.wrap(trainer, "_generate_and_score_completions", "generate_and_score")
    return trainer


def summarise(steps: list[dict]) -> dict:
    median = {key: statistics.median(s[key] for s in steps) for key in ("step_s", "cpu_s", *PHASES)}
    tokens = sum(s["tokens"] for s in steps)
    return {**median, "steps_per_s": 1 / median["step_s"],
            "rollout_tok_per_s": tokens / sum(s["generate"] for s in steps),
            "completion_tokens": tokens / sum(s["samples"] for s in steps),
            "shares": {name: sum(s[name] for s in steps) / sum(s["step_s"] for s in steps) for name in PHASES},
            "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8, help="P prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="G samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="L, the completion budget")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per side, after one warm-up each")
    parser.add_argument("--model-dir", default="",
                        help="a nanoseek model folder (weights + tokenizer); default: a random model")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    folder = args.model_dir
    if not folder:
        folder = tempfile.mkdtemp(prefix="nanoseek-grpo-bench-")
        build_model(folder)
    config = grpo.GRPOConfig(init=folder, tasks=TASKS, steps=args.steps + 1, prompts=args.prompts,
                             group_size=args.group_size, max_new_tokens=args.max_new_tokens, temperature=1.0,
                             micro_batch=args.prompts * args.group_size, progress=False)
    import transformers
    import trl

    ours, our_phases = nanoseek_trainer(folder, config)
    parameters = ours.model.num_parameters()
    results: dict = {"prompts": args.prompts, "group_size": args.group_size, "max_new_tokens": args.max_new_tokens,
                     "measured_steps": args.steps, "threads": torch.get_num_threads(),
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                     "load_average_1min": os.getloadavg()[0], "model": args.model_dir or "random (pipeline default size)",
                     "parameters": parameters["total"], "loss_type": config.loss_type, "torch": torch.__version__,
                     "transformers": transformers.__version__, "trl": trl.__version__}
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"{args.threads} threads (OMP_WAIT_POLICY={results['omp_wait_policy']}, "
          f"load {results['load_average_1min']:.1f}); "
          f"{parameters['total'] / 1e6:.2f}M parameters; P={args.prompts} G={args.group_size} L={args.max_new_tokens}, "
          f"loss {config.loss_type}", flush=True)

    times: dict[str, list[dict]] = {"nanoseek": [], "trl": []}

    def after_trl_step(step: int, record: dict) -> None:
        # Alternation: each TRL step is followed by the nanoseek step of the same index (same prompts).
        ran = {"trl": record, "nanoseek": nanoseek_step(ours, our_phases, step)}
        for name, r in ran.items():
            print(f"step {step} {'(warm-up) ' if step == 0 else ''}{name:>8}: {r['step_s']:6.2f} s, generate "
                  f"{r['generate']:5.2f} s, reward {r['reward']:5.3f} s, update {r['update']:5.2f} s, "
                  f"{r['tokens'] / r['samples']:5.1f} tokens/sample", flush=True)
            if step > 0:
                times[name].append(r)

    with tempfile.TemporaryDirectory(prefix="trl-grpo-bench-") as output_dir:
        trl_trainer(folder, args, config, output_dir, after_trl_step).train()
    trl_threads = [r.pop("threads") for r in times["trl"]]
    results["trl_threads"] = max(trl_threads, default=0)

    for name in times:
        results[name] = summarise(times[name])
    nano, theirs = results["nanoseek"], results["trl"]
    results["speedup"] = nano["steps_per_s"] / theirs["steps_per_s"]
    # CPU seconds per step barely move when other processes take turns on the cores (with passive
    # OpenMP waits), so their ratio is the load-robust second opinion on the speed-up.
    results["speedup_cpu_time"] = theirs["cpu_s"] / nano["cpu_s"]
    results["rollout_speedup"] = nano["rollout_tok_per_s"] / theirs["rollout_tok_per_s"]
    results["update_speedup"] = theirs["update"] / nano["update"]
    results["target"] = {"speedup": TARGET_SPEEDUP, "met": results["speedup"] >= TARGET_SPEEDUP}

    rows = [("implementation", "s/step", "steps/s", "rollout tok/s", "tokens/sample", "generate", "reward", "update",
             "other", "CPU s/step")]
    for name in ("nanoseek", "trl"):
        r = results[name]
        rows.append((name, f"{r['step_s']:.2f}", f"{r['steps_per_s']:.3f}", f"{r['rollout_tok_per_s']:,.0f}",
                     f"{r['completion_tokens']:.1f}", *(f"{100 * r['shares'][p]:.1f}%" for p in PHASES),
                     f"{r['cpu_s']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    print(f"nanoseek / TRL steps/s: {results['speedup']:.2f}x (target >= {TARGET_SPEEDUP}x); by CPU time per step: "
          f"{results['speedup_cpu_time']:.2f}x; rollout tok/s {results['rollout_speedup']:.2f}x; "
          f"update {results['update_speedup']:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
