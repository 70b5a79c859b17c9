"""How torch's OpenMP threads should wait on CPU: decode-shaped work under each setting, alone and beside busy
processes. Each setting runs in its own process, since libgomp reads its environment once, when torch loads it.

    python bench/openmp_wait.py                 # every setting, idle and beside one busy process
    python bench/openmp_wait.py --busy 0 1 2    # beside 0, 1 and 2 busy processes

One "token" is what a decode step of the embedded model does in its linear layers: 30 layers of SmolLM2-135M's
seven projections at batch 16, in the dtype the plan loads here.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin 100": {"GOMP_SPINCOUNT": "100"},
    "spin 1000": {"GOMP_SPINCOUNT": "1000"},
    "spin 10000": {"GOMP_SPINCOUNT": "10000"},
    "one thread": {"OMP_NUM_THREADS": "1"},
}
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down


def tokens(count: int, rows: int, layers: int) -> list[float]:
    """Seconds for each of ``count`` decode-shaped tokens, after a warm-up."""
    import torch

    from grpo_cli import cpu

    dtype = torch.bfloat16 if cpu.bf16_native() else torch.float32
    weights = [torch.randn(o, i, dtype=dtype) for o, i in SHAPES for _ in range(layers)]
    x = {i: torch.randn(rows, i, dtype=dtype) for _, i in SHAPES}
    seconds = []
    with torch.no_grad():
        for n in range(count + 3):
            start = time.perf_counter()
            for w in weights:
                torch.nn.functional.linear(x[w.shape[1]], w)
            if n >= 3:
                seconds.append(time.perf_counter() - start)
    return seconds


def busy(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="busy processes beside the measurement")
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of every setting")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(tokens(args.tokens, args.rows, args.layers)))
        return
    from grpo_cli import cpu

    results: dict = {}
    for neighbours in args.busy:
        others = busy(neighbours)
        try:
            time.sleep(0.5 if others else 0)
            for _ in range(args.rounds):
                for name, env in SETTINGS.items():
                    cmd = [sys.executable, __file__, "--one", name, "--tokens", str(args.tokens),
                           "--rows", str(args.rows), "--layers", str(args.layers)]  # fmt: skip
                    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
                    out = subprocess.run(cmd, env=clean | env, capture_output=True, text=True, check=True).stdout
                    results.setdefault((name, neighbours), []).extend(json.loads(out))
        finally:
            for other in others:
                other.kill()
    print(f"{cpu.describe()}; {args.rows} rows x {args.layers} layers; ms a token, median (min-max) of "
          f"{args.tokens} tokens x {args.rounds} rounds")  # fmt: skip
    header = " | ".join(f"{n} busy" for n in args.busy)
    print(f"| setting | {header} |\n|---|" + "---|" * len(args.busy))
    for name in SETTINGS:
        cells = []
        for n in args.busy:
            ms = [s * 1000 for s in results[(name, n)]]
            cells.append(f"{statistics.median(ms):.0f} ({min(ms):.0f}-{max(ms):.0f})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
