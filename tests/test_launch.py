"""`grpo train` under a launcher on CPU: two processes over gloo, the embedded model, tiny settings."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TINY = [
    "--max-completion-length", "8", "--lora-rank", "4", "--limit", "16", "--num-generations", "4", "--batch-size", "4",
    "--learning-rate", "1e-2",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores


def torchrun(*args) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "grpo_cli", *args]


def accelerate(*args, config: str | None = None) -> list[str]:
    where = ["--config_file", config] if config else ["--multi_gpu", "--num_processes", "2"]
    return [str(BIN / "accelerate"), "launch", *where, "--main_process_port", str(free_port()), "-m", "grpo_cli", *args]


def run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment())


def digests(stderr: str) -> dict[int, str]:
    return {int(r): d for r, d in re.findall(r"process (\d) of 2: adapter weights ([0-9a-f]+) at step", stderr)}


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_average_gradients_and_one_writes(tmp_path):
    from safetensors.torch import load_file

    (tmp_path / "recipe.yaml").write_text("warmup_ratio: 0.0\n")
    out = tmp_path / "out"
    started = time.time()
    result = run(torchrun("train", "--config", str(tmp_path / "recipe.yaml"), "--max-steps", "2", "--save-steps", "1",
                          *TINY, "--output-dir", str(out)))  # fmt: skip
    print(f"two-process run: {time.time() - started:.1f}s; {digests(result.stderr)}")
    assert result.returncode == 0, result.stdout + result.stderr
    # each process logs its adapter's hash: equal, though each trained on other prompts, so gradients were averaged
    hashes = digests(result.stderr)
    assert sorted(hashes) == [0, 1] and hashes[0] == hashes[1]
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(t.abs().max() > 0 for name, t in weights.items() if "lora_B" in name)  # it moved from zero
    # the main process alone prints and writes: each step line once, one metrics line a step, one adapter
    assert result.stdout.count("step 1/2 | reward") == 1 and result.stdout.count("step 2/2 | reward") == 1
    assert result.stdout.count("Plan: Unsloth on CPU") == 1
    assert "| 2 processes, DDP: every process holds the model and averages gradients" in result.stdout
    assert metric_steps(out) == [1, 2]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["adapter", "checkpoint-1", "checkpoint-2"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (out / "checkpoint-2").iterdir()}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--reward", "no_such_reward"], "unknown reward 'no_such_reward'"),  # found once the processes have met
        (["--num-generations", "4", "--batch-size", "3"], "3 x grad accum 1 x 2 processes = 6"),  # before that
    ],
)
def test_bad_input_stops_every_process_at_once(tmp_path, args, message):
    """Two processes as a launcher starts them; each must exit 2 on its own, with the error said once."""
    port = free_port()
    env = environment() | {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    command = [sys.executable, "-m", "grpo_cli", "train", *args, "--output-dir", str(tmp_path / "o")]
    started = time.time()
    processes = [
        subprocess.Popen(command, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=60) for p in processes]
    assert [p.returncode for p in processes] == [2, 2]
    assert time.time() - started < 30
    errors = [line for _, err in outputs for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "o").exists()
    # under torchrun itself
    result = run(torchrun("train", *args, "--output-dir", str(tmp_path / "o")), timeout=60)
    assert result.returncode != 0 and result.stderr.count(message) == 1


def test_sigint_to_the_launcher_saves_once_and_resume_continues(tmp_path):
    from peft import PeftConfig
    from safetensors.torch import load_file

    out = tmp_path / "out"
    command = torchrun("train", "--max-steps", "30", "--save-steps", "100", *TINY, "--output-dir", str(out))
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment())
    lines = []
    for line in launcher.stdout:  # wait for the first step, then interrupt the launcher alone
        lines.append(line)
        if line.startswith("step 1/30"):
            launcher.send_signal(signal.SIGINT)
            break
    lines += launcher.stdout.readlines()
    launcher.wait(timeout=120)
    output = "".join(lines)
    assert launcher.returncode != 0 and "Stopping after this step" in output, output
    checkpoints = [p.name for p in out.glob("checkpoint-*")]
    assert len(checkpoints) == 1, output
    step = int(checkpoints[0].split("-")[1])
    assert step < 30 and metric_steps(out) == list(range(1, step + 1))
    assert PeftConfig.from_pretrained(str(out / "adapter")).r == 4  # a loadable adapter
    assert load_file(out / "adapter" / "adapter_model.safetensors")
    assert json.loads((out / "adapter" / "grpo.json").read_text())["step"] == step
    # the same run continues under accelerate's launcher
    result = run(accelerate("train", "--resume", "latest", "--output-dir", str(out), "--max-steps", str(step + 2)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert metric_steps(out) == list(range(1, step + 3))
    hashes = digests(result.stderr)
    assert sorted(hashes) == [0, 1] and hashes[0] == hashes[1]


def test_fsdp2_falls_back_to_plain_trl_and_peft(tmp_path):
    from safetensors.torch import load_file

    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "fsdp2.yaml")
    out = tmp_path / "out"
    result = run(accelerate("train", "--max-steps", "1", *TINY, "--output-dir", str(out), config=recipe))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Plan: plain TRL + PEFT on CPU (" in result.stdout and "Unsloth does not train under fsdp2" in result.stdout
    weights = load_file(out / "adapter" / "adapter_model.safetensors")  # gathered whole from both processes
    assert weights["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 1536)
    assert metric_steps(out) == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.device_count() >= 2, reason="needs 2 CUDA GPUs")
def test_ddp_on_two_gpus_keeps_unsloth(tmp_path):
    model = os.environ.get("GRPO_GPU_MODEL", "smollm2-135m")
    out = tmp_path / "out"
    result = run(torchrun("train", "--model", model, "--max-steps", "2", *TINY, "--output-dir", str(out)), timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Plan: Unsloth on GPU" in result.stdout and "2 processes, DDP" in result.stdout
    hashes = digests(result.stderr)
    assert sorted(hashes) == [0, 1] and hashes[0] == hashes[1]
    assert metric_steps(out) == [1, 2]
