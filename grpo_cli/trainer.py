"""The mapping to TRL: GRPOConfig from the settings and the plan, and the GRPOTrainer class the plan trains with."""

from grpo_cli import dist, runs
from grpo_cli.config import Settings
from grpo_cli.errors import GrpoError
from grpo_cli.plan import Plan


def grpo_config(settings: Settings, plan: Plan):
    """TRL's GRPOConfig from our settings and the plan: recipe names that TRL dropped are mapped here, the
    algorithm's settings that Unsloth and TRL default differently are given explicitly, and the optimizer,
    precision and generation follow the plan."""
    from trl import GRPOConfig

    from rewards import split_weight

    t = settings.train
    args = dict(
        output_dir=t.output_dir,
        max_steps=t.max_steps,
        num_generations=t.num_generations,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        max_completion_length=t.max_completion_length,
        beta=t.beta,
        epsilon=t.epsilon,
        num_iterations=t.num_iterations,
        loss_type=t.loss_type,
        temperature=t.temperature,
        seed=t.seed,
        save_steps=t.save_steps,
        warmup_steps=t.warmup_ratio,  # transformers 5 reads a value below 1 as a ratio
        lr_scheduler_type=t.lr_scheduler_type,
        optim=t.optim,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        report_to=t.report_to,
        reward_weights=[split_weight(r)[1] for r in settings.data.rewards],
        disable_tqdm=True,
    )
    if settings.data.tools or settings.data.environment:
        args["max_tool_calling_iterations"] = settings.data.max_tool_calling_iterations
    args.update(dict(plan.algorithm), **t.extra)
    bitsandbytes = "8bit" in args["optim"] or "paged" in args["optim"]
    if bitsandbytes and (not plan.cuda or not plan.unsloth):
        why = "needs CUDA" if not plan.cuda else f"does not step {plan.strategy}'s sharded weights"
        print(f"{'CPU' if not plan.cuda else plan.strategy}: optimizer {args['optim']} {why}, using adamw_torch")
        args["optim"] = "adamw_torch"
    if not plan.cuda:
        args.update(use_cpu=True, bf16=False, fp16=False)
        args.setdefault("gradient_checkpointing", False)  # recomputing the forward costs time; memory is ample
    else:
        args.setdefault("bf16", plan.compute == "bf16")
        args.setdefault("fp16", plan.compute == "fp16")
    if plan.generator == "vllm":
        args["use_vllm"] = True
    if plan.generator == "server":
        args.update(use_vllm=True, vllm_mode="server", vllm_server_base_url=settings.model.vllm_server)
    if plan.processes > 1:  # every LoRA weight takes part in each step: no search for unused ones
        args.setdefault("ddp_find_unused_parameters", False)
    try:
        return GRPOConfig(**args)
    except ValueError as exc:  # TRL's own checks (batch sizes against num_generations and the like)
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GrpoError(
            f"the trainer settings do not fit together ({cause}): change them in the recipe or flags"
        ) from exc


def trainer_class(plan: Plan):
    """TRL's GRPOTrainer (Unsloth's, once unsloth has patched it on a GPU), with a check that the loss is finite,
    the batch built as grpo_cli/batch.py says (curriculum, dynamic sampling) and, in server mode, a weight sync
    that leaves the base as it loaded; otherwise used as it is on a GPU. Where the plan has the CPU speed paths, its
    transformers generation runs with the LoRA folded into the weights and faster sampling, and its log-prob
    forward computes each prompt once for its group."""
    import torch
    from trl import GRPOTrainer

    from grpo_cli.batch import BatchBuilder
    from grpo_cli.cpu_speed import cpu_generation, prompts_prefilled_once, shared_prompt_logps

    class Trainer(BatchBuilder, GRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if plan.generator == "server":  # the frozen base stays bit for bit as loaded
                sync_out_of_place(self.vllm_generation)

        def compute_loss(self, *args, **kwargs):
            out = super().compute_loss(*args, **kwargs)
            loss = out[0] if isinstance(out, tuple) else out
            # before backward, so the weights stay those of the last step; on every process at once under a launcher
            if dist.any_process(not torch.isfinite(loss.detach()).all()):
                raise runs.NumericError(
                    f"the loss is {loss.detach().float().mean().item()}: lower --learning-rate or max_grad_norm, "
                    "or look for rewards of extreme size"
                )
            return out

    if not plan.cpu_paths:
        return Trainer

    class CPUTrainer(Trainer):
        def _generate_single_turn(self, prompts, *args, **kwargs):
            with cpu_generation(self.model, len(prompts)), prompts_prefilled_once(self.model):
                return super()._generate_single_turn(prompts, *args, **kwargs)

        def _get_per_token_logps_and_entropies(
            self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
            compute_aux_loss=False, **multimodal,
        ):  # fmt: skip
            plain = (
                self.args.gradient_checkpointing  # no cache under gradient checkpointing
                or compute_aux_loss
                or any(v is not None for v in multimodal.values())
                or (batch_size or len(input_ids)) < len(input_ids)
            )
            with self.accelerator.autocast():
                shared = None if plain else shared_prompt_logps(
                    model, input_ids, attention_mask, logits_to_keep, compute_entropy
                )  # fmt: skip
            if shared is None:
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                    **multimodal,
                )  # fmt: skip
            return *shared, None

    return CPUTrainer


def sync_out_of_place(generation) -> None:
    """TRL's weight sync to a vLLM server (``VLLMGeneration._iter_named_params``), with each adapted weight sent as
    ``W + delta`` computed out of place, added in fp32 and rounded once, as Unsloth syncs its own vLLM. TRL merges the
    adapter into the live 16-bit base and unmerges it again (PEFT's merge_adapter/unmerge_adapter, in the base
    dtype): the frozen base would drift by rounding at every sync. TRL's own walk stays (its gathering under
    ZeRO-3 and FSDP, its names); only the merge is replaced."""
    import contextlib

    import torch
    from peft.tuners.lora import LoraLayer

    model = generation.model
    if not hasattr(model, "merge_adapter"):
        return  # no adapter: TRL sends the weights as they are
    walk = generation._iter_named_params
    layers = {
        vllm_name(generation, f"{name}.base_layer.weight"): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }

    @contextlib.contextmanager
    def no_merge():
        merge, unmerge = model.merge_adapter, model.unmerge_adapter
        model.merge_adapter = model.unmerge_adapter = lambda *args, **kwargs: None
        try:
            yield
        finally:
            model.merge_adapter, model.unmerge_adapter = merge, unmerge

    def merged(name, weight):
        layer = layers.get(name)
        if layer is None or layer.merged or layer.disable_adapters:
            return weight
        delta = sum(_full(layer.get_delta_weight(a)).float() for a in layer.active_adapters if a in layer.lora_A)
        return (_full(weight).float() + delta).to(weight.dtype) if torch.is_tensor(delta) else weight

    def iterate():
        with no_merge(), torch.no_grad():
            for name, weight in walk():
                yield name, merged(name, weight)

    generation._iter_named_params = iterate


def vllm_name(generation, name: str) -> str:
    """A parameter's name as TRL's sync sends it to vLLM (PEFT's prefix and base_layer gone, wrappers' prefixes
    gone)."""
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "modules_to_save.default."):
        name = name.replace(wrapper, "")
    return generation._fix_param_name_to_vllm(name)


def _full(tensor):
    """A sharded (FSDP2) tensor gathered whole; any other as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
