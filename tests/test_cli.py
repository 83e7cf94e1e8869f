import inspect
import json
import subprocess
import sys

import pytest

from conftest import random_model, tiny_config
from nanoseek import cli


def test_parser_matches_verb_table():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    assert set(sub.choices) == set(cli.VERBS)
    for name, fn in cli.VERBS.items():
        dests = {a.dest for a in sub.choices[name]._actions} - {"help"}
        assert dests == set(inspect.signature(fn).parameters), name
        assert inspect.getdoc(fn), f"verb {name} needs a docstring: it is its --help"


def test_info_counts_parameters_and_cache(tmp_path, capsys):
    config = tiny_config(num_nextn_predict_layers=1)
    random_model(config).save_pretrained(tmp_path)
    report = cli.info(str(tmp_path))
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    assert report["parameters_active_per_token"] == (report["parameters_total"]
                                                     - moe_layers * per_expert * (config.n_routed_experts - 2))
    assert report["layers"] == {"dense": 1, "moe": 2, "mtp": 1}
    assert report["cache_bytes_per_token"] == (24 + 8) * 3 * 4
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report


def test_cli_errors_are_clear_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nanoseek.cli", "info", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"model directory {tmp_path / 'missing'} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_demo_saves_loads_and_generates(tmp_path):
    tokens = cli.demo(out_dir=str(tmp_path / "demo"), max_new_tokens=5)
    assert len(tokens) == 5 and (tmp_path / "demo" / "config.json").exists()
