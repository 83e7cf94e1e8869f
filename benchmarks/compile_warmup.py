"""The compile warm-up of a server start, cold (an empty on-disk compile cache) and warm (the cache the
cold start filled), each in a fresh process:

    python benchmarks/compile_warmup.py [--config configs/bench-60m.json] [--rows 8] [--starts 2]

Each start runs what `nanoseek serve` runs before it listens, but on random weights: the compile cache
folder (`use_compile_cache`, pointed at a fresh temporary folder), a compiled Engine, and
`warm_up(rows)` over the row buckets of a batch of --rows rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def one_start(config_path: str, rows: int) -> dict:
    started = time.perf_counter()
    from nanoseek.infer.chat import use_compile_cache

    use_compile_cache()
    import torch

    from nanoseek.infer import Engine
    from nanoseek.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_file(config_path))
    model.init_weights(0.02)
    engine = Engine(model.eval(), eos_token_ids=[], compile=True)
    warm_up = engine.warm_up(rows)
    from torch._dynamo.utils import counters

    # Which on-disk caches answered: inductor's compiled graphs, and AOTAutograd's (the traced
    # forward before inductor); Dynamo's own tracing of the Python code runs at every start.
    hits = {f"{name}_{kind}": counters[group][f"{key}_{kind}"] for name, group, key in
            [("inductor", "inductor", "fxgraph_cache"), ("aot", "aot_autograd", "autograd_cache")]
            for kind in ("hit", "miss", "bypass")}
    return {"warm_up_s": round(warm_up, 1), "process_s": round(time.perf_counter() - started, 1),
            "graphs": engine.decode_compiles, "threads": torch.get_num_threads(), **hits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "bench-60m.json"))
    parser.add_argument("--rows", type=int, default=8, help="the server's --max-concurrent")
    parser.add_argument("--starts", type=int, default=2, help="the first is cold, the others warm")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_start(args.config, args.rows)))
        return
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "NANOSEEK_COMPILE_CACHE": folder}
        for i in range(args.starts):
            out = subprocess.run([sys.executable, __file__, "--child", "--config", args.config, "--rows", str(args.rows)],
                                 env=env, check=True, capture_output=True, text=True).stdout
            print(f"{'cold' if i == 0 else 'warm'}: {out.strip()}", flush=True)


if __name__ == "__main__":
    main()
