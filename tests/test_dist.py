"""Scale-out wiring that needs no second process: strategies, recipes, batch checks, the vLLM server."""

import dataclasses
import http.server
import json
import shlex
import socket
import threading
from pathlib import Path

import pytest

from grpo_cli import dist, models
from grpo_cli.config import Settings
from grpo_cli.errors import GrpoError
from grpo_cli.plan import Machine, resolve

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, "single"),
        ({"WORLD_SIZE": "4"}, "ddp"),
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "fsdp2"),
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}, "fsdp"),
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "zero2"),
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "zero3"),
    ],
)
def test_strategy_from_the_launchers_environment(env, expected):
    assert dist.strategy(env) == expected


def test_zero_stage_from_a_deepspeed_config_file(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    env = {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(config)}
    assert dist.strategy(env) == "zero3"


def launcher_environment(recipe: Path) -> tuple[object, dict]:
    """What `accelerate launch --config_file recipe` would pass its processes, from accelerate's own launcher code."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(recipe), "-m", "grpo_cli", "train"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return defaults, prepare_deepspeed_cmd_env(args)[1]
    return defaults, prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "zero2", "zero3"])
def test_accelerate_accepts_each_recipe_and_grpo_reads_its_strategy(name, monkeypatch):
    from accelerate.commands.launch import launch_command_parser

    recipe = RECIPES / f"{name}.yaml"
    assert recipe.read_text().startswith(
        f"# accelerate launch --config_file recipes/accelerate/{name}.yaml -m grpo_cli train"
    )
    defaults, env = launcher_environment(recipe)
    # accelerate copies nested keys without checking them: each must be one of its launch flags
    flags = {action.dest for action in launch_command_parser()._actions}
    nested = {f"fsdp_{k.removeprefix('fsdp_')}" for k in defaults.fsdp_config} | set(defaults.deepspeed_config)
    assert nested <= flags, nested - flags
    assert dist.strategy({**env, "WORLD_SIZE": "2"}) == name
    if name == "fsdp2":  # accelerate builds its FSDP plugin from that environment
        from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment

        with patch_environment(**{k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}):
            assert FullyShardedDataParallelPlugin().fsdp_version == 2
    for key, value in {**env, "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    assert resolve(Settings()).unsloth == (name == "ddp")
    assert dist.describe().endswith("trains with Unsloth") == (name == "ddp")


def test_a_recipe_with_an_unknown_key_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((RECIPES / "ddp.yaml").read_text() + "num_gpus: 2\n")
    with pytest.raises(ValueError, match="unknown keys"):
        launcher_environment(bad)


def test_batch_check_counts_the_processes(monkeypatch):
    from grpo_cli.config import load_settings

    flags = {"num_generations": 4, "per_device_train_batch_size": 3}
    with pytest.raises(GrpoError, match=r"3 x grad accum 1 = 3 must be divisible by num_generations 4"):
        load_settings(None, flags, announce=False)
    monkeypatch.setenv("WORLD_SIZE", "2")  # 3 x 2 = 6 completions at a time: still not whole groups of 4
    with pytest.raises(GrpoError, match=r"3 x grad accum 1 x 2 processes = 6 .* or --batch-size 2"):
        load_settings(None, flags, announce=False)
    monkeypatch.setenv("WORLD_SIZE", "4")  # 3 x 4 = 12: three groups of 4
    load_settings(None, flags, announce=False)


def test_server_mode_fields_of_trls_config(tmp_path):
    from grpo_cli.config import load_settings
    from grpo_cli.trainer import grpo_config

    s = load_settings(None, {"vllm_server": "http://gen-host:8000", "output_dir": str(tmp_path)}, announce=False)
    plan = resolve(s, Machine(cuda=True, cuda_bf16=True, vllm=True))
    assert plan.generator == "server" and plan.weights == "bf16"
    config = grpo_config(s, dataclasses.replace(plan, device="cpu"))
    assert (config.use_vllm, config.vllm_mode, config.vllm_server_base_url) == (True, "server", "http://gen-host:8000")
    with pytest.raises(GrpoError, match="is no URL: give http://HOST:PORT"):
        load_settings(None, {"vllm_server": "gen-host:8000"}, announce=False)


class Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_reachability(server):
    url = f"http://127.0.0.1:{server.server_port}"
    models.check_server(url)
    Health.status = 503
    try:
        with pytest.raises(GrpoError, match=r"/health answered HTTP 503"):
            models.check_server(url)
    finally:
        Health.status = 200
    with pytest.raises(GrpoError, match=r"does not answer .*Connection refused.*grpo serve --model"):
        models.check_server(f"http://127.0.0.1:{closed_port()}")


def test_train_with_an_unreachable_server_fails_before_loading(tmp_path):
    from tests.test_cli import grpo

    result = grpo("train", "--vllm-server", f"http://127.0.0.1:{closed_port()}", "--output-dir", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "does not answer" in result.stderr and not (tmp_path / "o").exists()


def test_serve_prints_trls_command_for_the_run(tmp_path):
    from trl.scripts.vllm_serve import make_parser

    from tests.test_cli import grpo

    recipe = tmp_path / "run.yaml"
    recipe.write_text("model: Qwen/Qwen2.5-1.5B-Instruct\nmax_prompt_length: 300\nmax_completion_length: 200\n")
    result = grpo("serve", "--config", str(recipe), "--port", "8123", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert lines["Train with"] == f"--vllm-server http://{socket.gethostname()}:8123"
    command = shlex.split(lines["Serving with"])
    assert command[:2] == ["trl", "vllm-serve"]
    (args,) = make_parser(prog="trl vllm-serve").parse_args_and_config(args=command[2:])  # TRL's own parser
    assert (args.model, args.max_model_len, args.port, args.gpu_memory_utilization) == (
        "Qwen/Qwen2.5-1.5B-Instruct", 500, 8123, 0.9
    )  # fmt: skip


def test_serve_without_vllm_says_where_to_run_it():
    from tests.test_cli import grpo

    result = grpo("serve", "--model", "qwen2.5-1.5b")
    assert result.returncode == 2 and "vLLM is not installed here" in result.stderr


def test_doctor_names_processes_and_strategy(monkeypatch):
    from grpo_cli import doctor

    for key, value in {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}.items():
        monkeypatch.setenv(key, value)
    facts = dict(doctor.diagnose()[0])
    assert facts["strategy"] == "fsdp2" and facts["processes"].startswith("2 processes, FSDP2")
    assert facts["plan"].startswith("plain TRL + PEFT on CPU")


@pytest.mark.parametrize(
    "env, args, message",
    [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, ["--eval-steps", "2"],
         "--eval-steps: evaluation during training runs alone or under DDP, not under fsdp2"),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, [],
         "DeepSpeed ZeRO is asked for but deepspeed is not installed: pip install deepspeed"),
    ],
)  # fmt: skip
def test_what_a_strategy_cannot_do_is_one_line(tmp_path, env, args, message):
    import importlib.util
    import os
    import subprocess
    import sys

    if "DEEPSPEED" in str(env) and importlib.util.find_spec("deepspeed"):
        pytest.skip("deepspeed is installed here")
    result = subprocess.run(
        [sys.executable, "-m", "grpo_cli", "train", *args, "--output-dir", str(tmp_path / "o")],
        capture_output=True, text=True, env={**os.environ, **env},
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr
    assert not (tmp_path / "o").exists()


def test_a_server_needs_cuda_and_vllm_where_training_runs(server, tmp_path):
    from tests.test_cli import grpo

    url = f"http://127.0.0.1:{server.server_port}"  # it answers: what is missing is here
    result = grpo("train", "--vllm-server", url, "--output-dir", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "from a CUDA machine with vLLM installed" in result.stderr


def test_agree_raises_the_processs_own_error():
    class Special(GrpoError):
        pass

    def fails():
        raise Special("the data file is missing")

    with pytest.raises(Special) as raised:  # its own type and traceback, for --debug
        dist.agree(fails)
    assert raised.value.everywhere  # one process: said once
    with pytest.raises(KeyError):
        dist.agree(lambda: {}["x"])
    assert dist.agree(lambda: 3) == 3
