from pathlib import Path

import pytest

from grpo_cli.config import EMBEDDED_SETTINGS, SYSTEM_PROMPT, load_settings
from grpo_cli.errors import GrpoError


def recipe(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_are_the_reference_recipe():
    s = load_settings(flags={"model": "qwen2.5-1.5b"})
    assert (s.train.num_generations, s.train.learning_rate, s.train.lr_scheduler_type) == (6, 5e-6, "cosine")
    assert (s.train.optim, s.train.max_steps, s.model.lora_rank) == ("paged_adamw_8bit", 250, 32)
    assert s.model.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert s.data.system_prompt == SYSTEM_PROMPT
    assert s.data.rewards == ["xmlcount", "soft_format", "strict_format", "integer", "correctness"]


def test_the_embedded_model_starts_from_the_settings_it_learns_with_and_says_so(tmp_path, capsys):
    s = load_settings()
    assert s.data.rewards == EMBEDDED_SETTINGS["rewards"] and s.train.learning_rate == 3e-4
    assert (s.train.max_completion_length, s.train.beta, s.train.max_steps) == (40, 0.0, 30)
    assert "smollm2-135m: starting from the settings it learns with, not the 8B reference" in capsys.readouterr().out
    s = load_settings(recipe(tmp_path, "learning_rate: 1.0e-4\n"), {"max_steps": 5})
    assert (s.train.learning_rate, s.train.max_steps, s.data.rewards) == (1e-4, 5, EMBEDDED_SETTINGS["rewards"])
    assert "replaced here: learning_rate, max_steps" in capsys.readouterr().out
    for path in ("recipes/qwen2.5-1.5b-gsm8k.yaml", "recipes/llama3.1-8b-gsm8k.yaml"):  # the reference stays
        s = load_settings(str(Path(__file__).parents[1] / path))
        assert (
            "correctness" in s.data.rewards and s.train.learning_rate == 5e-6 and s.data.system_prompt == SYSTEM_PROMPT
        )


def test_precedence_defaults_then_yaml_then_flags(tmp_path):
    path = recipe(tmp_path, "max_steps: 10\nlearning_rate: 1.0e-5\nlora_rank: 8\nsave_total_limit: 2\n")
    s = load_settings(path, {"max_steps": 3, "lora_rank": None, "model": "qwen2.5-1.5b"})
    assert s.train.max_steps == 3  # flag beats YAML
    assert s.train.learning_rate == 1e-5  # YAML beats default
    assert s.model.lora_rank == 8  # a flag left out (None) does not override
    assert s.train.num_generations == 6  # default stays
    assert s.train.extra == {"save_total_limit": 2}  # any GRPOConfig field passes through


def test_unknown_yaml_key_suggests_the_closest(tmp_path):
    with pytest.raises(GrpoError, match=r"unknown setting 'learning_rte' in .*r.yaml: did you mean 'learning_rate'\?"):
        load_settings(recipe(tmp_path, "learning_rte: 1.0e-5\n"))


def test_system_prompt_from_file(tmp_path):
    (tmp_path / "p.txt").write_text("Answer briefly.")
    assert load_settings(flags={"system_prompt": f"@{tmp_path}/p.txt"}).data.system_prompt == "Answer briefly."


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"per_device_train_batch_size": 6, "num_generations": 4},
         r"batch size 6 x grad accum 1 = 6 must be divisible by num_generations 4: use --num-generations 2 or 3 or 6"),
        ({"num_generations": 1, "per_device_train_batch_size": 2}, "num_generations must be at least 2"),
        ({"max_steps": 0}, "max_steps must be a positive integer, got 0"),
        ({"max_completion_length": -5}, "max_completion_length must be a positive integer"),
        ({"learning_rate": 0.0}, "learning_rate must be positive"),
        ({"lora_rank": 64, "max_lora_rank": 32}, "lora_rank 64 is above max_lora_rank 32"),
        ({"max_prompt_length": 900, "max_seq_length": 1024, "model": "qwen2.5-1.5b"}, "exceeds max_seq_length 1024"),
        ({"rewards": []}, "no reward given"),
    ],
)  # fmt: skip
def test_validation_says_how_to_fix(flags, message):
    with pytest.raises(GrpoError, match=message):
        load_settings(flags=flags)


def test_recipes_load(tmp_path):
    for path in sorted(Path(__file__).parents[1].glob("recipes/*.yaml")):
        assert path.read_text().startswith("# grpo train --config"), path
        load_settings(str(path))


def test_recipe_names_trl_dropped_still_work():
    from grpo_cli.plan import Machine, resolve
    from grpo_cli.trainer import grpo_config

    s = load_settings(flags={"warmup_ratio": 0.1, "max_steps": 20, "output_dir": "unused", "model": "qwen2.5-1.5b"})
    config = grpo_config(s, resolve(s, Machine()))
    assert config.warmup_steps == 0.1 and config.get_warmup_steps(20) == 2
    assert config.optim in ("adamw_torch", "adamw_torch_fused") and config.use_cpu  # paged 8-bit needs CUDA
    assert config.reward_weights == [1.0] * 5


@pytest.mark.parametrize(
    "flags, seq, prompt",
    [
        ({"max_prompt_length": 512}, 552, 512),  # the embedded model's 40-token completions: the context follows
        ({"max_prompt_length": 900, "model": "qwen2.5-1.5b"}, 1100, 900),
        ({"max_seq_length": 300, "max_completion_length": 200, "model": "qwen2.5-1.5b"}, 300, 100),  # prompt follows
        ({}, 512, 192),  # nothing chosen: the embedded model's own
    ],
)
def test_a_default_follows_the_length_the_user_chose(flags, seq, prompt, capsys):
    settings = load_settings(None, flags, announce=False)
    assert (settings.model.max_seq_length, settings.data.max_prompt_length) == (seq, prompt)


def test_the_model_seed_follows_the_run_seed_unless_chosen(tmp_path):
    assert load_settings(None, {"seed": 7}).model.random_state == 7
    recipe = tmp_path / "r.yaml"
    recipe.write_text("random_state: 11\nseed: 7\n")
    assert load_settings(str(recipe), {}).model.random_state == 11
