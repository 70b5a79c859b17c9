"""How the trainer builds a training batch (``_generate_and_score_completions``, TRL's and Unsloth's alike): the
sampler's rows at the curriculum's current level (grpo_cli/curriculum.py), then dynamic sampling.

Dynamic sampling (DAPO): a group whose completions all score the same has zero advantage and gives no gradient; its
generation is spent for nothing. Such groups are dropped and more prompts are generated, a round at a time, until
the batch is full or the rounds allowed are spent; then the step trains on what it has, the groups without spread
filling the rest, and says so in its metrics.

The extra prompts come from a stream of their own, drawn from the training set by the seed, the step and the round:
the sampler's own order is untouched, so the prompts a seed gives each step are those it gives without dynamic
sampling, and a resumed run draws the same extra prompts."""

import math
import random
import time

from grpo_cli.errors import GrpoError

METRIC = "dynamic_sampling/"
# The keys of the batch that TRL's and Unsloth's _generate_and_score_completions return, by how they merge
PROMPT_KEYS = ("prompt_ids", "prompt_mask")  # left-padded
TOKEN_KEYS = (
    "completion_ids", "completion_mask", "tool_mask", "old_per_token_logps", "ref_per_token_logps",
    "sampling_per_token_logps", "importance_sampling_ratio",
)  # fmt: skip  # right-padded; importance_sampling_ratio is (B, 1) at sequence level
SAMPLE_KEYS = ("advantages", "unsloth_rollout_logps_as_old")
RECOMPUTED = ("num_items_in_batch", "max_left_pad")  # summaries of the whole batch: computed again after the merge
# Unsloth's opt-in loss weights (UNSLOTH_GRPO_ZERO_VARIANCE_EXCLUDE, UNSLOTH_GRPO_LOSS_AGGREGATION) are normalized
# over one round's batch, and images come with counts per batch: neither merges across rounds
UNMERGEABLE = {
    "unsloth_sample_weight": "Unsloth's UNSLOTH_GRPO_ZERO_VARIANCE_EXCLUDE / UNSLOTH_GRPO_LOSS_AGGREGATION weights "
    "are normalized over one round's batch: unset them with dynamic sampling, which drops those groups itself",
}
COMPLETION_PAD = {
    "tool_mask": 1
}  # the right padding of the per-token keys: completion_ids takes the pad token, others 0


class MergeError(GrpoError):
    """A key of the trainer's batch that cannot be merged across generation rounds."""


def group_spread(rewards_per_func, weights, group: int):
    """Per group: True when its rewards vary. The rewards are combined as TRL combines them (weighted sum, a row that
    every reward left out excluded) and a group is flat when their std is zero, as TRL counts ``frac_reward_zero_std``.

    >>> import torch
    >>> group_spread(torch.tensor([[1.0], [1.0], [0.0], [1.0]]), torch.tensor([1.0]), 2).tolist()
    [False, True]
    """
    import torch
    from trl.trainer.utils import nanstd

    rewards = (rewards_per_func * weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
    std = nanstd(rewards.view(-1, group), dim=1)
    return ~torch.isclose(torch.nan_to_num(std, nan=0.0), torch.zeros_like(std))


def merge(outputs: list[dict], picks: list[tuple[int, int]], group: int, pad_token_id: int) -> dict:
    """One batch from the groups ``picks`` ((round, group index)) of the rounds' outputs of
    ``_generate_and_score_completions``: each key's rows taken in that order, the prompts left-padded and the
    per-token keys right-padded to the widest round, the batch's summaries computed again."""
    import torch

    keys = list(outputs[0])
    if any(list(o) != keys for o in outputs):
        raise MergeError(f"the rounds' batches have different keys: {keys} and {[list(o) for o in outputs]}")
    prompt_width = max(o["prompt_ids"].shape[1] for o in outputs)
    completion_width = max(o["completion_ids"].shape[1] for o in outputs)

    def padded(key: str, value, out: dict):
        if key in PROMPT_KEYS:
            fill = pad_token_id if key == "prompt_ids" else 0
            return torch.nn.functional.pad(value, (prompt_width - value.shape[1], 0), value=fill)
        if key in TOKEN_KEYS and value.shape[1] == out["completion_ids"].shape[1]:
            fill = pad_token_id if key == "completion_ids" else COMPLETION_PAD.get(key, 0)
            return torch.nn.functional.pad(value, (0, completion_width - value.shape[1]), value=fill)
        return value  # a value per sample

    merged = {}
    for key in keys:
        values = [o[key] for o in outputs]
        if key in RECOMPUTED:
            continue
        if all(v is None for v in values):
            merged[key] = None
            continue
        if key in UNMERGEABLE:
            raise MergeError(f"{key}: {UNMERGEABLE[key]}")
        if key not in PROMPT_KEYS + TOKEN_KEYS + SAMPLE_KEYS:
            raise MergeError(f"{key} is no key of a text batch that dynamic sampling knows how to merge")
        if any(v is None for v in values):
            raise MergeError(f"{key} is missing from some rounds' batches")
        full = [padded(key, v, o) for v, o in zip(values, outputs)]
        merged[key] = torch.cat([full[r][g * group : (g + 1) * group] for r, g in picks])
    first = outputs[0]
    if "num_items_in_batch" in first:  # what the loss is normalized by: the tokens it counts
        mask = (
            merged["completion_mask"] * merged["tool_mask"]
            if merged.get("tool_mask") is not None
            else merged["completion_mask"]
        )
        merged["num_items_in_batch"] = mask.sum().to(first["num_items_in_batch"].dtype)
    if first.get("max_left_pad") is not None:  # Unsloth's: the most left padding of any prompt in the batch
        most = int((merged["prompt_ids"] == pad_token_id).sum(dim=1).max())
        merged["max_left_pad"] = torch.full_like(first["max_left_pad"][:1], most).expand(len(picks) * group, -1).clone()
    return {key: merged.get(key) for key in keys}


def extra_indices(seed: int, step: int, round_: int, size: int, count: int) -> list[int]:
    """``count`` distinct rows of a training set of ``size`` for a step's extra round, from the seed alone.

    >>> extra_indices(3407, 5, 1, 100, 3) == extra_indices(3407, 5, 1, 100, 3) != extra_indices(3407, 6, 1, 100, 3)
    True
    """
    rng = random.Random(seed * 1_000_003 + step * 1_009 + round_)
    return rng.sample(range(size), min(count, size))


class BatchBuilder:
    """Mixed into the GRPOTrainer class (TRL's, or Unsloth's where it trains). ``dynamic_sampling_rounds``: None is
    off, else the extra generation rounds a step may take; ``curriculum``: a Curriculum, or None."""

    dynamic_sampling_rounds: int | None = None
    curriculum = None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._round_rewards = rewards  # every process's, as TRL gathers them: the groups whole
        return rewards

    def _generate_and_score_completions(self, inputs):
        training = self.model.training
        if training and self.curriculum is not None:
            inputs = self.curriculum.stage(inputs)
        output = super()._generate_and_score_completions(inputs)
        if not training:
            return output
        sampled = self._round_rewards  # the sampler's batch: what the curriculum reads
        if self.dynamic_sampling_rounds is not None:
            output = self._fill_batch(inputs, output)
        if self.curriculum is not None:
            self._follow(sampled)
        return output

    def _follow(self, rewards) -> None:
        """The curriculum reads the task's score of the sampler's batch; its level goes into the step's metrics."""
        from grpo_cli.curriculum import REWARD

        column = [i for i, name in enumerate(self.reward_func_names) if name.removesuffix("_reward") == REWARD]
        moved = self.curriculum.observe(rewards[:, column[0]], self.num_generations) if column else None
        if moved and self.accelerator.is_main_process:
            print(moved, flush=True)
        self._metrics["train"]["curriculum/level"].append(float(self.curriculum.level))

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.curriculum is not None and self.accelerator.is_main_process:
            import json
            import os

            from grpo_cli.curriculum import STATE

            folder = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
            with open(os.path.join(folder, STATE), "w") as f:
                json.dump(self.curriculum.state(), f)

    def _extra_rows(self, count: int, round_: int) -> list[dict]:
        """Each of ``count`` extra prompts, repeated for its group as TRL's sampler repeats it, at the curriculum's
        level."""
        picked = extra_indices(self.args.seed, self.state.global_step, round_, len(self.train_dataset), count)
        rows = [self.train_dataset[i] for i in picked for _ in range(self.num_generations)]
        return self.curriculum.stage(rows) if self.curriculum is not None else rows

    def _fill_batch(self, inputs: list[dict], output: dict) -> dict:
        group = self.num_generations
        needed = len(inputs) // group
        metrics = self._metrics["train"]
        # TRL's own figures describe the sampler's batch, as without dynamic sampling: the extra rounds' are not kept
        lengths = {k: len(v) for k, v in metrics.items()}
        started = time.perf_counter()
        outputs, kept, flat, generated, round_ = [output], [], [], 0, 0
        while True:
            spread = group_spread(self._round_rewards, self.reward_weights, group).tolist()
            kept += [(round_, g) for g, varies in enumerate(spread) if varies]
            flat += [(round_, g) for g, varies in enumerate(spread) if not varies]
            generated += len(spread)
            if len(kept) >= needed or round_ == self.dynamic_sampling_rounds:
                break
            round_ += 1
            rate = len(kept) / generated  # the share of groups with spread so far: ask for enough to fill the rest
            count = needed if rate == 0 else min(needed, math.ceil((needed - len(kept)) / rate))
            outputs.append(super()._generate_and_score_completions(self._extra_rows(count, round_)))
        for key in list(metrics):
            if key not in lengths:
                del metrics[key]
            else:
                del metrics[key][lengths[key] :]
        picks = kept[:needed] + flat[: max(0, needed - len(kept))]
        filled = max(0, needed - len(kept))
        batch = output if round_ == 0 else merge(outputs, picks, group, self._tokenizer.pad_token_id)
        for name, value in {
            "dropped_groups": len(flat) - filled,  # without spread, not trained
            "extra_rounds": round_,
            "extra_completions": (generated - needed) * group,
            "unused_groups": max(0, len(kept) - needed),  # with spread, beyond what the batch holds
            "flat_groups_trained": filled,  # at the limit: the batch filled with groups without spread
            "extra_seconds": time.perf_counter() - started if round_ else 0.0,
        }.items():
            metrics[METRIC + name].append(float(value))
        return batch
