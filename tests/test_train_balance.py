"""Aux-loss-free balancing works: with the auxiliary loss off in both runs and the same seed, the
bias update lowers max/mean expert load over the last 20% of steps by at least 30%."""

from nanoseek.train import load_train_config, pretrain
from nanoseek.train.metrics import read_metrics
from test_train import corpus, tiny_overrides  # noqa: F401 (corpus is a fixture)

STEPS = 300


def late_imbalance(tmp_path, corpus, name: str, rate: float) -> float:
    overrides = tiny_overrides(tmp_path, corpus, f"name={name}", f"steps={STEPS}", "save_every=0",
                               "balance.aux_loss_alpha=0", f"balance.bias_update_rate={rate}", "mtp_weight=0",
                               "data.batch_size=4", "data.seq_len=16", "optimizer.lr=1e-2")
    pretrain(load_train_config(None, overrides))
    records = read_metrics(tmp_path / name / "pretrain" / "metrics.jsonl")
    late = records[-STEPS // 5:]
    return sum(r["imbalance"] for r in late) / len(late)


def test_bias_balancing_lowers_imbalance_by_30_percent(tmp_path, corpus):
    free = late_imbalance(tmp_path, corpus, "free", 0.0)
    balanced = late_imbalance(tmp_path, corpus, "balanced", 1e-2)
    print(f"max/mean load over the last 20% of steps: {free:.3f} without balancing, {balanced:.3f} with")
    assert balanced <= 0.7 * free
