"""`grpo serve`: TRL's vLLM server for the model a run trains, so that generation has GPUs of its own."""

import importlib.util
import os
import shlex
import socket
import sys
from pathlib import Path

from grpo_cli.config import Settings
from grpo_cli.errors import GrpoError


def command(settings: Settings, host: str, port: int, tensor_parallel_size: int) -> list[str]:
    """`trl vllm-serve` for this run: its base model, room for its longest prompt and completion, and the GPU share.
    No LoRA setting: in server mode TRL merges the adapter and sends the server the merged weights each step."""
    from grpo_cli import models

    m = settings.model
    return [
        "trl", "vllm-serve", "--model", models.resolve_model(m.model),
        "--max-model-len", str(settings.data.max_prompt_length + settings.train.max_completion_length),
        "--gpu-memory-utilization", str(m.gpu_memory_utilization),
        "--tensor-parallel-size", str(tensor_parallel_size),
        "--host", host, "--port", str(port),
    ]  # fmt: skip


def url(host: str, port: int) -> str:
    """What `grpo train --vllm-server` takes: a server bound to every interface is reached by this machine's name."""
    return f"http://{socket.gethostname() if host in ('0.0.0.0', '::') else host}:{port}"


def serve(settings: Settings, host: str, port: int, tensor_parallel_size: int, dry_run: bool) -> None:
    line = command(settings, host, port, tensor_parallel_size)
    if not dry_run and importlib.util.find_spec("vllm") is None:
        raise GrpoError(
            "vLLM is not installed here: run `grpo serve` on a CUDA machine with the GPU install "
            "(pip install 'grpo-cli[gpu]', or make install there); --dry-run prints the command"
        )
    print(f"Train with: --vllm-server {url(host, port)}")
    print(f"Serving with: {shlex.join(line)}", flush=True)
    if dry_run:
        return
    trl = Path(sys.executable).parent / "trl"  # the trl of this environment
    if not trl.is_file():
        raise GrpoError(f"{trl} is missing: reinstall trl in this environment (make install)")
    os.execv(str(trl), [str(trl), *line[1:]])
