"""Several processes under a launcher (accelerate launch, torchrun): which one this is, what strategy runs, and
keeping the processes agreed. The distribution itself is accelerate's (DDP, FSDP2, DeepSpeed ZeRO) through TRL's
trainer; this module only reads the launcher's environment and joins its process group."""

import os

from grpo_cli.errors import GrpoError

# What `accelerate launch --config_file F` tells its processes, as accelerate's own launcher sets it
STRATEGIES = {
    "ddp": "DDP: every process holds the model and averages gradients",
    "fsdp": "FSDP (version 1): parameters sharded across processes",
    "fsdp2": "FSDP2: parameters sharded across processes",
    "zero2": "DeepSpeed ZeRO-2: optimizer state and gradients sharded",
    "zero3": "DeepSpeed ZeRO-3: parameters, gradients and optimizer state sharded",
}
UNSLOTH_STRATEGIES = {"single", "ddp"}  # where Unsloth runs; the others train with plain TRL + PEFT


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """The process that prints the run and writes its files."""
    return rank() == 0


def is_local_main() -> bool:
    """The first process on this machine: it prints what every process agreed on (once a machine)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def process_name() -> str:
    return f"process {rank()} of {world_size()}"


def digest(model) -> str:
    """A short hash of the trainable weights: equal on every process when the gradients were averaged."""
    import hashlib

    h = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            h.update(name.encode())
            h.update(param.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def strategy(env: dict | None = None) -> str:
    """single, ddp, fsdp, fsdp2, zero2 or zero3, from the launcher's environment."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") or _zero_stage(env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"))
        return "zero3" if str(stage) == "3" else "zero2"
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp2" if env.get("FSDP_VERSION", "1") == "2" else "fsdp"
    return "ddp" if int(env.get("WORLD_SIZE", "1")) > 1 else "single"


def _zero_stage(config_file: str | None) -> int | None:
    """The ZeRO stage of a DeepSpeed JSON config file (accelerate's deepspeed_config_file)."""
    import json

    if not config_file:
        return None
    try:
        with open(config_file) as f:
            return json.load(f).get("zero_optimization", {}).get("stage")
    except (OSError, ValueError):
        return None


def describe() -> str:
    """One line: processes, strategy and what trains under it."""
    name = strategy()
    if name == "single":
        return "1 process"
    engine = "Unsloth" if name in UNSLOTH_STRATEGIES else "plain TRL + PEFT (Unsloth does not support it)"
    return f"{world_size()} processes, {STRATEGIES[name]}; trains with {engine}"


def start(cpu: bool, timeout: float = 1800) -> None:
    """Join the launcher's process group (accelerate's state, which the trainer reuses): gloo on CPU, NCCL on CUDA,
    waiting ``timeout`` seconds for the others at a collective (the trainer's ddp_timeout). One process: nothing."""
    import importlib.util
    from datetime import timedelta

    if strategy() in ("zero2", "zero3") and importlib.util.find_spec("deepspeed") is None:
        error = GrpoError("DeepSpeed ZeRO is asked for but deepspeed is not installed: pip install deepspeed")
        error.everywhere = True
        raise error
    if world_size() == 1:
        return
    from accelerate import PartialState

    if cpu:  # accelerate would name the device cpu:0, which torch.load cannot map a resumed optimizer state to
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    PartialState(cpu=cpu, timeout=timedelta(seconds=timeout))


def finish() -> None:
    """Leave the process group before the process exits, error or not (gloo aborts a process that exits in it)."""
    import sys

    if "torch.distributed" in sys.modules and sys.modules["torch.distributed"].is_initialized():
        sys.modules["torch.distributed"].destroy_process_group()


def agree(check, *args, **kwargs):
    """Run ``check`` on every process; when it raises on any of them, every process raises (its own error, or the
    lowest failing rank's), so that all stop together instead of some waiting for the others. Returns ``check``'s
    result."""
    result, own, error = None, None, None
    try:
        result = check(*args, **kwargs)
    except Exception as exc:
        own, error = exc, str(exc) if isinstance(exc, GrpoError) else f"{type(exc).__name__}: {exc}"
    errors = [error]
    if world_size() > 1:
        import torch.distributed

        errors = [None] * world_size()
        torch.distributed.all_gather_object(errors, error)
    failed = [e for e in errors if e is not None]
    if own is not None:
        own.everywhere = all(e == error for e in errors)  # the same on every process: said once a machine
        raise own
    if failed:
        agreed = GrpoError(f"process {errors.index(failed[0])} of {world_size()}: {failed[0]}")
        agreed.everywhere = True
        raise agreed
    return result


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any of them (a stop asked for on one stops all)."""
    if world_size() == 1:
        return flag
    import torch
    import torch.distributed
    from accelerate import PartialState

    value = torch.tensor([int(flag)], device=PartialState().device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def from_main(value):
    """The main process's ``value``, on every process (what the others pass is not read): a figure only the main
    process measured, such as the held-out evaluation's, read alike everywhere."""
    if world_size() == 1:
        return value
    import torch.distributed
    from accelerate import PartialState

    box = [value]
    torch.distributed.broadcast_object_list(box, src=0, device=PartialState().device)
    return box[0]


def check_batch(per_device: int, grad_accum: int, generations: int, processes: int | None = None) -> None:
    """TRL generates per_device x processes x grad_accum completions at a time, in whole groups of G.

    >>> check_batch(4, 1, 4, processes=2)
    >>> check_batch(3, 1, 4, processes=2)
    Traceback (most recent call last):
    ...
    grpo_cli.errors.GrpoError: batch size 3 x grad accum 1 x 2 processes = 6 must be divisible by num_generations 4: use --num-generations 2 or 3 or 6, or --batch-size 2
    """
    processes = processes or world_size()
    batch = per_device * grad_accum * processes
    if batch % generations == 0:
        return
    fits = next(b for b in range(1, generations + 1) if b * grad_accum * processes % generations == 0)
    over = f" x {processes} processes" if processes > 1 else ""
    divisors = " or ".join(str(d) for d in range(2, batch + 1) if batch % d == 0)
    raise GrpoError(
        f"batch size {per_device} x grad accum {grad_accum}{over} = {batch} must be divisible by num_generations "
        f"{generations}: use " + (f"--num-generations {divisors}, or " if divisors else "") + f"--batch-size {fits}"
    )
