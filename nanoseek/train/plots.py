"""PNG plots of a finished stage: loss, per-layer expert load over training, expert specialisation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

from nanoseek.train.metrics import read_metrics  # noqa: E402

if TYPE_CHECKING:
    from nanoseek.model.transformer import Transformer
    from nanoseek.train.pretrain import TrainConfig


def plot_loss(records: list[dict], path: Path) -> None:
    steps = [r["step"] + 1 for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "ce", "mtp"):
        if key in records[0]:
            ax.plot(steps, [r[key] for r in records], label=key, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_expert_load(records: list[dict], path: Path) -> None:
    """One panel per MoE layer: share of routed tokens per expert (rows) over steps (columns), and
    the max/mean imbalance curve of every layer."""
    layers = len(records[0]["expert_load"])
    names = records[0].get("moe_layers") or [f"MoE {i}" for i in range(layers)]
    fig, axes = plt.subplots(layers + 1, 1, figsize=(8, 2.2 * (layers + 1)), squeeze=False)
    steps = [r["step"] + 1 for r in records]
    for layer in range(layers):
        ax = axes[layer, 0]
        load = [[r["expert_load"][layer][e] for r in records] for e in range(len(records[0]["expert_load"][layer]))]
        image = ax.imshow(load, aspect="auto", cmap="viridis", interpolation="nearest",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, len(load) - 0.5, -0.5))
        ax.set_ylabel(f"{names[layer]}\nexpert")
        fig.colorbar(image, ax=ax, label="share of tokens")
    ax = axes[layers, 0]
    for layer in range(layers):
        ax.plot(steps, [r["imbalance_per_layer"][layer] for r in records], label=names[layer], linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("max / mean load")
    ax.legend(fontsize="small", ncol=max(1, layers // 4))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_specialisation(result: dict, path: Path) -> None:
    """Per MoE layer, a heatmap of routing fractions: rows are task types then text segments."""
    layers = result["layers"]
    fig, axes = plt.subplots(len(layers), 1, figsize=(8, 2.0 + 1.6 * len(layers)), squeeze=False)
    for i, entry in enumerate(layers):
        ax = axes[i, 0]
        rows = entry["task"]["fractions"] + entry["segment"]["fractions"]
        labels = entry["task"]["labels"] + entry["segment"]["labels"]
        image = ax.imshow(rows, aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_yticks(range(len(labels)), labels)
        ax.axhline(len(entry["task"]["labels"]) - 0.5, color="white", linewidth=1)
        ax.set_title(f"layer {entry['layer']}: NMI(task; expert) {entry['task']['nmi']:.3f} "
                     f"(shuffled {entry['task']['nmi_shuffled']:.3f}), NMI(segment; expert) "
                     f"{entry['segment']['nmi']:.3f} (shuffled {entry['segment']['nmi_shuffled']:.3f})",
                     fontsize=8)
        fig.colorbar(image, ax=ax, label="share of routed slots")
    axes[-1, 0].set_xlabel("expert")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# (metric key, panel title) of the RL curves; a key a run did not log is left out.
RL_PANELS = (("reward", "mean reward"), ("accuracy", "accuracy (rollouts)"), ("format", "strict format rate"),
             ("completion_tokens", "mean completion tokens"), ("kl", "KL to reference (k3)"),
             ("eval_pass@1", "held-out pass@1"))


def plot_rl(records: list[dict], path: Path, label: str | None = None) -> None:
    """GRPO curves over steps, one panel per metric; several runs can share a figure through
    `plot_rl_runs`."""
    plot_rl_runs({label or "": records}, path)


def plot_rl_runs(runs: dict[str, list[dict]], path: Path) -> None:
    keys = [(k, t) for k, t in RL_PANELS if any(k in r for records in runs.values() for r in records)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], keys):
        for label, records in runs.items():
            points = [(r["step"] + 1, r[key]) for r in records if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), label=label or None, linewidth=1, marker="." if len(points) < 20 else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if any(runs):
        axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(stage_dir: Path, model: "Transformer", config: "TrainConfig") -> dict[str, str]:
    """loss.png and expert_load.png from metrics.jsonl; with a tokenizer and MoE layers, also the
    routing analysis (specialisation.json + expert_specialisation.png). Returns name -> path."""
    stage_dir = Path(stage_dir)
    records = read_metrics(stage_dir / "metrics.jsonl")
    written: dict[str, str] = {}
    if records:
        plot_loss(records, stage_dir / "loss.png")
        written["loss"] = str(stage_dir / "loss.png")
        if records[0]["expert_load"]:
            plot_expert_load(records, stage_dir / "expert_load.png")
            written["expert_load"] = str(stage_dir / "expert_load.png")
    if config.tokenizer and model.moe_layers() and config.analysis_tasks and config.analysis_problems:
        from nanoseek.tokenizer import Tokenizer
        from nanoseek.train.specialization import route, specialisation

        routed = route(model, Tokenizer.load(config.tokenizer), list(config.analysis_tasks),
                       config.analysis_problems, config.analysis_tasks, seed=config.seed)
        result = specialisation(routed, seed=config.seed)
        (stage_dir / "specialisation.json").write_text(json.dumps(result, indent=1))
        plot_specialisation(result, stage_dir / "expert_specialisation.png")
        written["specialisation"] = str(stage_dir / "expert_specialisation.png")
    return written
