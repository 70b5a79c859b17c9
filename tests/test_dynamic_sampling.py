"""Dynamic sampling held to the batch that TRL's real _generate_and_score_completions returns (a tiny Llama of random
weights on CPU) and to the keys Unsloth's patched one adds (read from its source)."""

import re

import pytest
import torch

from grpo_cli.batch import PROMPT_KEYS, RECOMPUTED, SAMPLE_KEYS, TOKEN_KEYS, UNMERGEABLE, MergeError, merge
from tests.real_api import source_file

G = 2
FLAT = "w3"  # prompts that start with it score the same whatever the completion


def spread_or_flat(prompts, completions, **kwargs):
    return [1.0 if p.startswith(FLAT) else float(sum(map(ord, c)) % 7) for p, c in zip(prompts, completions)]


@pytest.fixture
def trainer(tmp_path, monkeypatch):
    return make_trainer(tmp_path, monkeypatch)


def make_trainer(tmp_path, monkeypatch, rewards=(spread_or_flat,)):
    """grpo's trainer class on the CPU plan, around a two-layer Llama: 2 groups of 2 completions a step."""
    from datasets import Dataset
    from trl import GRPOConfig

    from grpo_cli.config import Settings
    from grpo_cli.plan import Machine, resolve
    from grpo_cli.trainer import trainer_class
    from tests.fakes import tiny_llama, torch_logprob, word_tokenizer

    torch_logprob(monkeypatch)
    tokenizer = word_tokenizer()
    model = tiny_llama(len(tokenizer), tokenizer.pad_token_id)
    args = GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, max_steps=2, per_device_train_batch_size=4, num_generations=G,
        max_completion_length=6, learning_rate=1e-2, gradient_checkpointing=False, report_to="none",
        save_strategy="no", disable_tqdm=True, seed=0, beta=0.0,
    )  # fmt: skip
    prompts = [f"{FLAT} w4", f"{FLAT} w5 w6", "w7 w8", "w9 w10 w11 w12", "w13", "w14 w15", "w16 w17 w18", "w19"]
    trainer = trainer_class(resolve(Settings(), Machine()))(
        model=model, reward_funcs=list(rewards), args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.model.train()
    return trainer


def rows(*prompts):
    return [{"prompt": p} for p in prompts for _ in range(G)]


def texts(trainer, batch):
    tokenizer = trainer.processing_class
    return [tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"])]


def test_a_flat_group_is_replaced_by_one_with_spread_in_trls_own_batch_layout(trainer):
    plain = trainer._generate_and_score_completions(rows(f"{FLAT} w4", "w7 w8"))
    trainer._metrics["train"].clear()
    trainer.dynamic_sampling_rounds = 2
    batch = trainer._generate_and_score_completions(rows(f"{FLAT} w4", "w7 w8"))
    assert list(batch) == list(plain)  # the keys TRL returns, in its order
    assert set(batch) <= set(PROMPT_KEYS + TOKEN_KEYS + SAMPLE_KEYS + RECOMPUTED)
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim:
            assert value.shape[0] == 4, key
    questions = texts(trainer, batch)
    assert questions[:2] == ["w7 w8"] * 2 and not any(q.startswith(FLAT) for q in questions)
    groups = batch["advantages"].view(-1, G)
    assert (groups.abs().sum(dim=1) > 0).all()  # every group trained on has a gradient
    assert batch["num_items_in_batch"] == batch["completion_mask"].sum()
    assert batch["completion_ids"][batch["completion_mask"] == 0].eq(trainer.processing_class.pad_token_id).all()
    figures = {k.split("/")[1]: v for k, v in trainer._metrics["train"].items() if k.startswith("dynamic_sampling/")}
    assert (
        figures["dropped_groups"][0] >= 1
        and figures["extra_rounds"][0] >= 1
        and figures["flat_groups_trained"] == [0.0]
    )
    generated = 2 + figures["extra_completions"][0] / G  # every group generated is trained, dropped or left over
    assert generated == 2 + figures["dropped_groups"][0] + figures["unused_groups"][0]
    assert len(trainer._metrics["train"]["reward"]) == 1  # TRL's figures: the sampler's batch, as without


def test_at_the_limit_the_step_trains_on_what_it_has_and_says_so(trainer):
    trainer.dynamic_sampling_rounds = 0
    batch = trainer._generate_and_score_completions(rows(f"{FLAT} w4", "w7 w8"))
    assert texts(trainer, batch)[0] == f"{FLAT} w4"  # no extra round: the sampler's batch as it was
    figures = {k.split("/")[1]: v for k, v in trainer._metrics["train"].items() if k.startswith("dynamic_sampling/")}
    assert figures["flat_groups_trained"] == [1.0] and figures["extra_rounds"] == [0.0]


def test_the_extra_prompts_depend_on_the_seed_and_step_alone(trainer):
    trainer.dynamic_sampling_rounds = 1
    first = trainer._extra_rows(3, 1)
    trainer._generate_and_score_completions(rows("w7 w8", "w13"))  # generation does not move the stream
    assert trainer._extra_rows(3, 1) == first and len(first) == 3 * G
    trainer.state.global_step = 1
    assert trainer._extra_rows(3, 1) != first


def test_it_trains_with_gradient_accumulation_and_two_iterations(tmp_path, monkeypatch):
    """Two steps of the plain TRL trainer, each from a generation of 2 accumulated micro-batches reused for 2
    iterations."""
    import dataclasses

    from datasets import Dataset
    from trl import GRPOConfig

    from grpo_cli.config import Settings
    from grpo_cli.plan import Machine, resolve
    from grpo_cli.trainer import trainer_class
    from tests.fakes import tiny_llama, torch_logprob, word_tokenizer

    torch_logprob(monkeypatch)
    tokenizer = word_tokenizer()
    model = tiny_llama(len(tokenizer), tokenizer.pad_token_id)
    args = GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, max_steps=2, per_device_train_batch_size=2, num_generations=G,
        gradient_accumulation_steps=2, num_iterations=2, max_completion_length=6, learning_rate=1e-2,
        gradient_checkpointing=False, report_to="none", save_strategy="no", disable_tqdm=True, seed=0, beta=0.0,
        logging_steps=1,
    )  # fmt: skip
    prompts = [f"{FLAT} w4", f"{FLAT} w5", "w7 w8", "w9 w10", f"{FLAT} w6", "w14 w15", "w16", f"{FLAT} w19"]
    plan = dataclasses.replace(resolve(Settings(), Machine()), trainer="trl", cpu_paths=False)
    trainer = trainer_class(plan)(
        model=model, reward_funcs=spread_or_flat, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.dynamic_sampling_rounds = 3
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    logged = [h for h in trainer.state.log_history if "dynamic_sampling/extra_rounds" in h]
    assert len(logged) == 1 and logged[0]["dynamic_sampling/dropped_groups"] > 0  # one generation for both steps


def outputs_of(widths, completion_widths, pad=0):
    """Two rounds' batches in TRL's layout: prompts left-padded, completions right-padded, per round widths."""
    made = []
    for r, (p, c) in enumerate(zip(widths, completion_widths)):
        prompt = torch.full((4, p), 10 + r)
        prompt[0, 0] = pad  # one left pad in the first row
        mask = (prompt != pad).long()
        made.append({
            "prompt_ids": prompt, "prompt_mask": mask, "completion_ids": torch.full((4, c), 20 + r),
            "completion_mask": torch.ones(4, c, dtype=torch.long), "advantages": torch.arange(4.0) + 4 * r,
            "num_items_in_batch": torch.tensor(4 * c), "old_per_token_logps": None,
            "max_left_pad": torch.tensor(4 * [1]).unsqueeze(-1),
        })  # fmt: skip
    return made


def test_merging_pads_each_side_as_trl_does_and_recounts_the_batch():
    first, second = outputs_of((3, 5), (4, 2))
    batch = merge([first, second], [(1, 1), (0, 0)], G, pad_token_id=0)
    assert batch["prompt_ids"].shape == (4, 5) and batch["completion_ids"].shape == (4, 4)
    assert batch["prompt_ids"][2].tolist() == [0, 0, 0, 10, 10]  # the first round's row, left-padded to 5
    assert batch["completion_ids"][0].tolist() == [21, 21, 0, 0] and batch["completion_mask"][0].tolist() == [
        1,
        1,
        0,
        0,
    ]
    assert batch["advantages"].tolist() == [6.0, 7.0, 0.0, 1.0]
    assert batch["num_items_in_batch"] == 2 * 2 + 2 * 4 and batch["old_per_token_logps"] is None
    assert batch["max_left_pad"].squeeze(1).tolist() == [3] * 4  # the first round's first row: 1 pad + 2 more


def test_a_key_it_cannot_merge_is_said_not_guessed():
    first, second = outputs_of((3, 3), (2, 2))
    for out in (first, second):
        out["unsloth_sample_weight"] = torch.ones(4)
    with pytest.raises(MergeError, match="UNSLOTH_GRPO_ZERO_VARIANCE_EXCLUDE"):
        merge([first, second], [(0, 0), (1, 0)], G, 0)
    for out in (first, second):
        out.pop("unsloth_sample_weight")
        out["pixel_values"] = torch.ones(3, 8)
    with pytest.raises(MergeError, match="pixel_values is no key of a text batch"):
        merge([first, second], [(0, 0), (1, 0)], G, 0)


def test_every_key_of_trls_and_unsloths_batch_is_known():
    """The keys the installed TRL and Unsloth put in the batch; a new one fails here until it is placed."""
    vision = {"pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
              "token_type_ids", "mm_token_type_ids", "image_position_ids", "num_images", "num_tiles",
              "pixel_position_ids"}  # fmt: skip
    known = set(PROMPT_KEYS + TOKEN_KEYS + SAMPLE_KEYS + RECOMPUTED) | set(UNMERGEABLE) | vision
    for module in ("trl.trainer.grpo_trainer", "unsloth.models.rl_replacements"):
        text = source_file(module).read_text()
        assigned = set(re.findall(r'output\["(\w+)"\] =', text))
        assert assigned and assigned <= known, (module, assigned - known)
    body = source_file("trl.trainer.grpo_trainer").read_text()
    literal = re.search(r"output = \{\n(.*?)\n        \}", body, re.S)[1]
    assert set(re.findall(r'"(\w+)":', literal)) <= known


def test_the_curriculum_reads_the_task_score_column_of_the_sampled_batch(tmp_path, monkeypatch, capsys):
    """Under TRL's own reward names (the function's __name__), the curriculum finds task_score and moves."""
    import dataclasses

    from grpo_cli.curriculum import Curriculum
    from tests.test_curriculum import CHAIN

    def task_score_reward(completions, **kwargs):
        return [1.0] * len(completions)

    trainer = make_trainer(tmp_path, monkeypatch, (spread_or_flat, task_score_reward))
    trainer.curriculum = Curriculum(dataclasses.replace(CHAIN, curriculum={"window": 1}))
    trainer._generate_and_score_completions(rows("w7 w8", "w13"))
    assert trainer.curriculum.level == 1 and "level 0 -> 1" in capsys.readouterr().out
    assert trainer._metrics["train"]["curriculum/level"] == [1.0]


def test_unsloths_patched_batch_still_asks_the_trainer_for_its_rewards():
    """On a GPU the trainer under the mixin is Unsloth's compiled GRPOTrainer: its rewards still come through
    self._calculate_rewards (the mixin keeps them), and its wrapper of _generate_and_score_completions is a method
    the mixin's super() reaches."""
    replacements = source_file("unsloth.models.rl_replacements").read_text()
    assert (
        "rewards_per_func = self._calculate_rewards(inputs, prompts, completions, completion_ids_list)" in replacements
    )
    rl = source_file("unsloth.models.rl").read_text()
    assert "trainer_cls._generate_and_score_completions = wrapped" in rl
    assert "return original(self, *args, **kwargs)" in rl
