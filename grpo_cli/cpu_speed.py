"""The CPU training and inference speed paths, applied where the run plan says (``plan.cpu_paths``) and nowhere
else: the LoRA folded into the weights while generating (packed for oneDNN where that measured faster, see
grpo_cli/cpu.py), fast sampling, each repeated prompt prefilled once for its group, the prompts' common opening run
once, and the shared-prompt log-probs. Each steps aside, with one line, where the model or the generation settings
do not allow it."""

from contextlib import contextmanager


@contextmanager
def merged_lora(model):
    """Fold each 16-bit LoRA layer into its base weight while generating: the same function with one matmul a
    projection instead of three. The base weights are put back as they were (no merge/unmerge rounding drift)."""
    import torch
    from peft.tuners.lora import Linear

    swapped = []
    with torch.no_grad():
        for layer in model.modules():
            base = layer.get_base_layer() if isinstance(layer, Linear) else None
            if base is None or layer.merged or layer.disable_adapters or not _foldable(layer):
                continue
            if not base.weight.is_floating_point():  # 4-bit: left as is
                continue
            original = base.weight.data
            base.weight.data = _folded(layer, original)
            layer.merged_adapters.append(layer.active_adapters[0])
            swapped.append((layer, base, original))
    try:
        yield
    finally:
        for layer, base, original in swapped:
            base.weight.data = original
            layer.merged_adapters.clear()


def _foldable(layer) -> bool:
    """A LoRA layer whose adapter is one plain weight delta: one active adapter, no DoRA, no LoRA bias."""
    if len(layer.active_adapters) != 1:
        return False
    name = layer.active_adapters[0]
    return not layer.use_dora.get(name, False) and not getattr(layer, "lora_bias", {}).get(name, False)


def _linears(model) -> list:
    """(module, weight) for each linear layer on CPU that oneDNN packs, the weight a LoRA layer computes with
    unfolded; a LoRA layer that cannot be folded keeps its own forward."""
    import torch
    from peft.tuners.lora import Linear

    from grpo_cli.cpu import packs

    bases = {id(m.get_base_layer()) for m in model.modules() if isinstance(m, Linear)}
    found = [
        (m, m.get_base_layer().weight if isinstance(m, Linear) else m.weight)
        for m in model.modules()
        if (isinstance(m, Linear) and (m.merged or m.disable_adapters or _foldable(m)))
        or (type(m) is torch.nn.Linear and id(m) not in bases)
    ]
    return [(m, w) for m, w in found if w.device.type == "cpu" and w.is_floating_point() and packs(w.dtype)]


def _folded(module, weight):
    """The weight a layer computes with now: a LoRA layer's active adapter folded in, as ``merged_lora`` does."""
    from peft.tuners.lora import Linear

    if not isinstance(module, Linear) or module.merged or module.disable_adapters:
        return weight
    return weight + module.get_delta_weight(module.active_adapters[0]).to(weight.dtype)


@contextmanager
def packed_linears(model, rows: int):
    """While generating, each linear layer computes with its weight (the adapter folded in) pre-packed for oneDNN,
    where that measured faster on this machine (grpo_cli/cpu.py); elsewhere the LoRA is folded into the weights
    (``merged_lora``). Packing happens at each call: the adapter changes between calls while training."""
    import torch

    from grpo_cli import cpu

    layers = _linears(model)
    if not layers or not cpu.packed_linear_faster([w for _, w in layers], rows):
        with merged_lora(model):
            yield
        return
    before = {module: vars(module).get("forward") for module, _ in layers}  # hooks someone set stay
    try:
        with torch.no_grad():
            for module, weight in layers:
                bias = getattr(module.get_base_layer() if hasattr(module, "get_base_layer") else module, "bias", None)
                packed = torch.ops.mkldnn._reorder_linear_weight(_folded(module, weight), rows)
                module.forward = lambda x, p=packed, b=bias: torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")
        yield
    finally:
        for module, forward in before.items():
            if forward is None:
                vars(module).pop("forward", None)  # the class's own forward again
            else:
                module.forward = forward


@contextmanager
def cpu_generation(model, rows: int):
    """Generation on CPU, where the plan has the CPU speed paths: the LoRA folded into the weights, packed where
    that is faster, and fast sampling."""
    with packed_linears(model, rows), fast_sampling():
        yield


def cache_shareable(model, cache=None) -> str | None:
    """Why a prefill's cache cannot be copied from one row to others, or None when it can. It can when every layer
    keeps keys and values alone (full, sliding or indexed attention in a DynamicCache, whose batch_select_indices and
    batch_repeat_interleave copy all of a row). Linear-attention, Mamba and hybrid layers keep a recurrent state as
    well, which those calls leave behind or lack. Without ``cache``, the cache the model's forward builds from its
    config is judged, before any prefill; with it, the cache a prefill returned."""
    import torch
    from transformers import cache_utils

    shareable = (cache_utils.DynamicLayer, cache_utils.DynamicSlidingWindowLayer, cache_utils.DynamicIndexedLayer)
    if cache is not None:
        if type(cache) is not cache_utils.DynamicCache:
            return f"its {type(cache).__name__} is not a DynamicCache of keys and values"
        layers = sorted({type(layer).__name__ for layer in cache.layers if type(layer) not in shareable})
        return f"its cache layers {', '.join(layers)} keep more than keys and values" if layers else None
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):  # the trainer's model under a launcher
        model = model.module
    config = model.config.get_text_config(decoder=True)
    layer_types, _ = cache_utils.get_layer_types_and_kwargs(config)
    built = {kind: cache_utils.DYNAMIC_LAYER_TYPE_MAPPING.get(kind) for kind in layer_types}
    kinds = sorted(kind for kind, layer in built.items() if layer not in shareable)
    if kinds:
        layers = sorted({built[kind].__name__ if built[kind] else "no cache layer" for kind in kinds})
        return f"its {', '.join(kinds)} layers keep more than keys and values ({', '.join(layers)})"
    return None


def generation_shareable(model, kwargs: dict) -> str | None:
    """Why generate, called with ``kwargs``, cannot go on from a cache prefilled one row a prompt, or None when it
    can. Beams and several sequences a prompt multiply the rows inside generate (the cache passed in is not), a
    cache_implementation builds generate's own cache, and use_cache=False ignores it. The settings are read as
    generate reads them: its keyword arguments, then the generation_config passed (TRL passes its
    generation_kwargs that way), then the model's generation_config."""
    configs = (kwargs.get("generation_config"), getattr(model, "generation_config", None))

    def setting(name):
        if kwargs.get(name) is not None:
            return kwargs[name]
        return next((getattr(c, name) for c in configs if getattr(c, name, None) is not None), None)

    found = [f"{name}={setting(name)}" for name in ("num_beams", "num_return_sequences") if (setting(name) or 1) > 1]
    if setting("cache_implementation") not in (None, "hybrid"):  # generate drops "hybrid", a legacy hub default
        found.append(f"cache_implementation={setting('cache_implementation')!r}")
    if setting("use_cache") is False:
        found.append("use_cache=False")
    return f"the generation settings {', '.join(found)} leave no room for a prefilled cache" if found else None


_stepped_aside: set[str] = set()


def step_aside(line: str) -> None:
    """Say once in this process that a CPU speed path is off, and why: the run goes on as TRL's would."""
    if line not in _stepped_aside:
        _stepped_aside.add(line)
        print(line)


@contextmanager
def prompts_prefilled_once(model):
    """TRL repeats each prompt G times in a row; generate would compute each copy. While this is on, a call whose
    rows repeat runs each distinct prompt once (all but its last token, positions as generate counts them with
    left padding), copies its keys and values to the repeats, and generate goes on from there: the same tokens,
    the prompt's compute divided by G. Where the model's cache or the generation settings do not allow it
    (``cache_shareable``, ``generation_shareable``), generate runs as it is, and a line says so once."""
    import torch

    generate = model.generate
    unshareable = cache_shareable(model)  # the model does not change while this is on

    def sharing(input_ids=None, attention_mask=None, **kwargs):
        if input_ids is None or attention_mask is None or input_ids.shape[1] < 2 or "past_key_values" in kwargs:
            return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        keys = torch.cat([input_ids, attention_mask], 1)
        distinct, rows = torch.unique_consecutive(keys, dim=0, return_inverse=True)
        if len(distinct) == len(input_ids):
            return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        reason = unshareable or generation_shareable(model, kwargs)
        if reason is None:
            ids, mask = distinct[:, : input_ids.shape[1] - 1], distinct[:, input_ids.shape[1] : -1]
            positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            with torch.no_grad():
                cache = model(
                    input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
                ).past_key_values
            reason = cache_shareable(model, cache)
        if reason:
            step_aside(f"CPU: each repeated prompt is prefilled row by row, as in TRL: {reason}")
            return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        cache.batch_select_indices(rows)
        return generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, **kwargs)

    before = vars(model).get("generate")  # a wrapper someone set on this model stays
    model.generate = sharing
    try:
        yield
    finally:
        if before is None:
            del model.generate
        else:
            model.generate = before


def shared_prompt_logps(model, input_ids, attention_mask, logits_to_keep: int, compute_entropy: bool):
    """The G completions of a prompt share it: run each distinct prompt once, then every completion on its cached
    keys and values (gradients flow back through the cache). The same log-probs and entropies as one forward over
    prompt + completion, with the prompt's tokens computed once instead of G times. None when nothing is shared, or
    when the model's cache cannot be shared (``cache_shareable``, said once)."""
    import torch

    start = input_ids.size(1) - logits_to_keep - 1  # the last prompt token predicts the first completion token
    if start < 1:
        return None
    keys = torch.cat([input_ids[:, :start], attention_mask[:, :start]], 1)
    prompts, rows = torch.unique(keys, dim=0, return_inverse=True)
    if len(prompts) == len(input_ids):
        return None
    reason = cache_shareable(model)
    if reason is None:
        cache = model(
            input_ids=prompts[:, :start], attention_mask=prompts[:, start:], use_cache=True, logits_to_keep=1
        ).past_key_values
        reason = cache_shareable(model, cache)
    if reason:
        step_aside(f"CPU: log-probs run over each prompt and completion in one forward, as in TRL: {reason}")
        return None
    cache.batch_select_indices(rows)
    suffix = input_ids[:, start:]
    labels = suffix.masked_fill(attention_mask[:, start:] == 0, -100)
    out = model(
        input_ids=suffix, attention_mask=attention_mask, past_key_values=cache, labels=labels, fused_lm_head=True
    )
    return out.log_probs, out.entropy if compute_entropy else None


@contextmanager
def fast_sampling():
    """On CPU, torch.multinomial draws an exponential for every vocabulary entry: 8 ms a token for 8 rows of a 49k
    vocabulary on 2 cores. One uniform a row against the cumulative distribution draws from the same distribution
    in 0.3 ms; transformers' sampling calls torch.multinomial, so it is swapped while generating."""
    import torch

    multinomial = torch.multinomial

    def sample(probs, num_samples, replacement=False, *, generator=None, out=None):
        if num_samples != 1 or probs.device.type != "cpu" or out is not None:
            return multinomial(probs, num_samples, replacement, generator=generator, out=out)
        cdf = probs.double().cumsum(-1)
        u = torch.rand(cdf.shape[:-1] + (1,), dtype=cdf.dtype, generator=generator) * cdf[..., -1:]
        return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)

    torch.multinomial = sample
    try:
        yield
    finally:
        torch.multinomial = multinomial


def prefix_once(model, tokens: list[list[int]], pad: int) -> dict:
    """generate's inputs for prompts that open alike (the chat template and system prompt): the common opening
    runs once and its keys and values are copied to every row; each row is then the opening, its padding, and
    its own tokens (the padding masked, positions counted past it, as with left padding). With no common opening
    of 16 tokens or more, or a model whose cache cannot be shared (``cache_shareable``, said once), or
    generation settings that leave no room for it (``generation_shareable`` on the model's generation_config):
    plain left padding."""
    import torch

    common = 0
    shortest = min(len(t) for t in tokens)
    while common < shortest - 1 and all(t[common] == tokens[0][common] for t in tokens):
        common += 1
    if common < 16 or len(tokens) < 2:
        return _opening_and_rows(model, tokens, pad, 0)  # plain left padding
    reason = cache_shareable(model) or generation_shareable(model, {})
    if reason is None:
        opening = torch.tensor([tokens[0][:common]], device=model.device)
        cache = model(input_ids=opening, use_cache=True, logits_to_keep=1).past_key_values
        reason = cache_shareable(model, cache)
    if reason:
        step_aside(f"CPU: the prompts' common opening is prefilled row by row, as plain generate does: {reason}")
        return _opening_and_rows(model, tokens, pad, 0)
    cache.batch_repeat_interleave(len(tokens))
    return {**_opening_and_rows(model, tokens, pad, common), "past_key_values": cache}


def _opening_and_rows(model, tokens: list[list[int]], pad: int, common: int) -> dict:
    """Each row as the first ``common`` tokens, its padding, then its own tokens; with ``common`` 0, left padding."""
    import torch

    width = max(len(t) for t in tokens) - common
    rows = [(t[:common], [pad] * (width - len(t) + common), t[common:]) for t in tokens]
    ids = torch.tensor([a + b + c for a, b, c in rows], device=model.device)
    mask = torch.tensor([[1] * len(a) + [0] * len(b) + [1] * len(c) for a, b, c in rows], device=model.device)
    return {"input_ids": ids, "attention_mask": mask}
