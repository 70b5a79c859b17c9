"""What this CPU computes fast: its kind from its flags, and each CPU speed path that depends on the machine,
measured on it once and cached (GRPO_PACKED_LINEAR=1 or 0 decides without measuring)."""

import hashlib
import json
import os
import platform
import time
from pathlib import Path


def flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((x for x in text.splitlines() if x.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def kind(cpu_flags: set[str] | None = None, machine: str | None = None) -> str:
    """The CPU's class for grpo's choices: AMX, AVX-512 with BF16, AVX-512 without, AVX2 only, Arm, or other.

    >>> kind({"avx2", "avx512f", "avx512_bf16"}, "x86_64"), kind({"avx2", "fma"}, "x86_64"), kind(set(), "aarch64")
    ('avx512_bf16', 'avx2', 'arm')
    """
    cpu_flags = flags() if cpu_flags is None else cpu_flags
    machine = machine or platform.machine()
    if machine.lower() in ("aarch64", "arm64"):
        return "arm"
    for name, needs in [("amx", "amx_bf16"), ("avx512_bf16", "avx512_bf16"), ("avx512", "avx512f"), ("avx2", "avx2")]:
        if needs in cpu_flags:
            return name
    return "other"


BF16_ON, BF16_OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")  # UNSLOTH_CPU_BF16, as Unsloth reads it


def bf16_native(cpu_flags: set[str] | None = None, machine: str | None = None) -> bool:
    """Whether Unsloth's CPU loader loads bf16 here (else fp32): UNSLOTH_CPU_BF16 when set, else the CPU's flags,
    as unsloth_zoo.cpu.runtime.cpu_bf16_supported decides.

    >>> bf16_native({"avx2", "avx512f"}, "x86_64"), bf16_native({"amx_bf16"}, "x86_64"), bf16_native({"bf16"}, "arm64")
    (False, True, True)
    """
    if bf16_forced():
        return os.environ["UNSLOTH_CPU_BF16"].strip().lower() in BF16_ON
    cpu_flags = flags() if cpu_flags is None else cpu_flags
    if kind(cpu_flags, machine) == "arm":
        return "bf16" in cpu_flags
    return bool(cpu_flags & {"amx_bf16", "avx512_bf16"})


def bf16_forced() -> bool:
    """UNSLOTH_CPU_BF16 decides bf16 or fp32 on CPU, not the flags."""
    return os.environ.get("UNSLOTH_CPU_BF16", "").strip().lower() in BF16_ON + BF16_OFF


def model_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next(x.partition(":")[2].strip() for x in text.splitlines() if x.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe() -> str:
    return f"{model_name()}, {kind()}, {os.cpu_count()} cores"


def _cache() -> Path:
    from grpo_cli.config import cache_dir

    return cache_dir() / "cpu.json"


def best_time(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def packs(dtype) -> bool:
    """oneDNN packs this dtype here (bf16 needs AVX-512 or AVX-NE-CONVERT, for one)."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
    except RuntimeError:
        return False
    return True


def linear_seconds(weight, rows: int, repeats: int = 5) -> tuple[float, float]:
    """Seconds of torch's linear and of oneDNN's packed linear on ``weight`` for ``rows`` rows (the best of
    ``repeats``; packed is inf where oneDNN does not pack the dtype). The input draws from its own generator, not
    the run's random state."""
    import torch

    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = best_time(lambda: torch.nn.functional.linear(x, weight), repeats)
        if not packs(weight.dtype):
            return plain, float("inf")
        p = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        return plain, best_time(lambda: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""), repeats)


def packed_linear_faster(weights: list, rows: int) -> bool:
    """Whether oneDNN's linear on a pre-packed weight beats torch's default linear for ``rows`` rows (the
    generation batch) on these weights, here. On a 2-core AVX2 EPYC it is about 2.8x faster at 8 rows (MKL's small-batch
    sgemm reads the weights at a third of the memory bandwidth). Measured once a machine, dtype, shapes and batch."""
    import torch

    override = os.environ.get("GRPO_PACKED_LINEAR")
    if override == "0" or not weights or not packs(weights[0].dtype):
        return False
    if override == "1":
        return True
    shapes = sorted({tuple(w.shape) for w in weights})
    # keyed by the threads chosen at start: while other processes hold cores the run has fewer (grpo_cli/threads.py)
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or torch.get_num_threads()
    key = hashlib.sha1(
        f"{model_name()}|{sorted(flags())}|{threads}|{torch.__version__}|{weights[0].dtype}|{shapes}|{rows}".encode()
    ).hexdigest()[:16]
    cache = _cache()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]["packed"]
    if torch.get_num_threads() < threads:  # a busy machine measures nothing true: torch's linear until it is free
        return False
    plain = packed = 0.0
    for w in {tuple(w.shape): w for w in weights}.values():  # one weight of each shape: the model's own
        count = sum(tuple(v.shape) == tuple(w.shape) for v in weights)
        seconds = linear_seconds(w, rows)
        plain, packed = plain + count * seconds[0], packed + count * seconds[1]
    faster = packed < 0.9 * plain
    known[key] = {"packed": faster, "plain_s": plain, "packed_s": packed, "rows": rows, "cpu": describe()}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known, indent=1))
    except OSError:
        pass  # measured again next time
    choice = "packed oneDNN linear" if faster else "torch's default linear"
    print(
        f"CPU ({kind()}): generation at batch {rows} uses {choice} (packed runs at {plain / packed:.1f}x the "
        "default's speed here; measured once, cached)"
    )
    return faster
