"""Inference: the base model and the adapter on the same prompts, with the same template."""

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from grpo_cli.adapter import find_adapter, fingerprint
from grpo_cli.errors import GrpoError


@dataclass
class Sampling:
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 1024
    seed: int = 3407
    greedy: bool = False


def chat_texts(tokenizer, questions: list[str], system_prompt: str) -> list[str]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [
        tokenizer.apply_chat_template(
            system + [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in questions
    ]


@dataclass
class Conversation:
    """One completion: the assistant's turns and, where it called tools, their results, as TRL hands a tool
    conversation to the rewards; with the calls made and how many failed (raised, timed out, or no such tool)."""

    messages: list[dict]
    calls: int = 0
    failures: int = 0
    environment: object | None = None  # the rollout's environment instance, for its get_reward

    @property
    def text(self) -> str:
        """The final assistant message's text, what the answer is read from."""
        return next((m.get("content") or "" for m in reversed(self.messages) if m["role"] == "assistant"), "")


def transcript(conversation: Conversation) -> str:
    r"""A conversation as text to read: each call as ``-> name(arguments)``, each result as ``<- result``.

    >>> transcript(Conversation([
    ...     {"role": "assistant", "content": "", "tool_calls": [
    ...         {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "6*7"}}}]},
    ...     {"role": "tool", "name": "calculator", "content": "42"},
    ...     {"role": "assistant", "content": "<answer>42</answer>"}]))
    "-> calculator(expression='6*7')\n<- 42\n<answer>42</answer>"
    """
    lines = []
    for message in conversation.messages:
        if message["role"] == "tool":
            lines.append(f"<- {message['content']}")
            continue
        if message.get("content"):
            lines.append(message["content"])
        for call in message.get("tool_calls") or []:
            function = call.get("function", {})
            arguments = function.get("arguments")
            shown = (
                ", ".join(f"{k}={v!r}" for k, v in arguments.items())
                if isinstance(arguments, dict)
                else repr(arguments)
            )
            lines.append(f"-> {function.get('name')}({shown})")
    return "\n".join(lines)


def run_tool_calls(calls: list[dict], tools: dict) -> tuple[list[dict], int]:
    """The tool messages for one assistant turn's calls, and how many failed; as TRL's ``_tool_call_loop`` makes
    them: a failure becomes ``{'error': ...}`` for the model to read, and never stops anything."""
    messages, failures = [], 0
    for call in calls:
        name = call.get("function", {}).get("name", call.get("name", "unknown"))
        try:
            if call.get("type") != "function":
                raise ValueError(f"Unsupported tool call type: {call.get('type')}")
            if name not in tools:
                raise ValueError(f"Tool {name} not found.")
            result = tools[name](**call["function"]["arguments"])
        except Exception as exc:
            failures += 1
            result = {"error": str(exc)}
        messages.append({"role": "tool", "name": name, "content": result if isinstance(result, list) else str(result)})
    return messages, failures


def converse(generate, tokenizer, prompts: list[list[dict]], sampling: Sampling, toolset=None, rows=None):
    """Each prompt's completion as a Conversation. With tools, the loop TRL trains with: the prompt is rendered
    with the tools' schemas, each turn's calls are parsed with the tokenizer's response template and run, their
    results appended, and the model goes on, up to ``max_iterations`` rounds and ``sampling.max_tokens`` tokens
    of completion in all (a round whose tool results would pass that is taken back and the row ends, as in TRL).
    ``generate(texts, sampling)`` is the engine's; ``rows`` are the data rows (an environment's reset reads them)."""
    import dataclasses

    from trl.chat_template_utils import parse_response

    if toolset is None:
        texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
        return [Conversation([{"role": "assistant", "content": t}]) for t in generate(texts, sampling)]

    def render(history, schemas):
        return tokenizer.apply_chat_template(
            history,
            tools=schemas or None,
            chat_template=toolset.rollout_template,
            add_generation_prompt=True,
            tokenize=False,
        )

    def count(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    conversations, histories, tools, schemas = [], [], [], []
    for prompt, row in zip(prompts, rows or [{"prompt": p} for p in prompts]):  # infer: the prompt is the row
        row_tools, environment, observation = toolset.for_row(row)
        if isinstance(observation, str) and observation:  # reset's observation joins the last user message
            prompt = prompt[:-1] + [{**prompt[-1], "content": prompt[-1]["content"] + observation}]
        conversations.append(Conversation([], environment=environment))
        histories.append(list(prompt))
        tools.append(row_tools)
        schemas.append(list(row_tools.values()))
    opening = [count(render(h, s)) for h, s in zip(histories, schemas)]
    active = list(range(len(prompts)))
    for round in range(toolset.max_iterations + 1):
        texts = [render(histories[i], schemas[i]) for i in active]
        left = {i: sampling.max_tokens - (count(t) - opening[i]) for i, t in zip(active, texts)}
        outputs = generate(texts, dataclasses.replace(sampling, max_tokens=max(1, max(left.values()))))
        calling = []
        for i, text, output in zip(active, texts, outputs):
            ids = tokenizer(output, add_special_tokens=False)["input_ids"][: max(1, left[i])]
            message = parse_response(tokenizer, ids, prefix=tokenizer(text, add_special_tokens=False)["input_ids"])
            histories[i].append(message)
            conversations[i].messages.append(message)
            if message.get("tool_calls") and round < toolset.max_iterations:
                results, failures = run_tool_calls(message["tool_calls"], tools[i])
                conversations[i].calls += len(message["tool_calls"])
                conversations[i].failures += failures
                if count(render(histories[i] + results, schemas[i])) - opening[i] > sampling.max_tokens:
                    continue  # no room left for the results and an answer: the row ends here, as in TRL
                histories[i] += results
                conversations[i].messages += results
                calling.append(i)
        active = calling
        if not active:
            break
    return conversations


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
    """Generation on CPU: the LoRA folded into the weights, packed where that is faster, and fast sampling.
    Elsewhere nothing changes."""
    if model.device.type != "cpu":
        with merged_lora(model):
            yield
        return
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


def generate_hf(model, tokenizer, texts: list[str], sampling: Sampling, batch_size: int = 64) -> list[str]:
    """transformers generation, left-padded batches, seeded so that runs repeat."""
    import torch

    tokenizer.padding_side = "left"
    torch.manual_seed(sampling.seed)
    kwargs = (
        dict(do_sample=False)
        if sampling.greedy
        else dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
    )
    outputs = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start : start + batch_size], add_special_tokens=False)["input_ids"]
        with torch.no_grad(), cpu_generation(model, len(tokens)):
            batch = prefix_once(model, tokens, tokenizer.pad_token_id)
            ids = model.generate(
                **batch, max_new_tokens=sampling.max_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs
            )
        outputs += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return outputs


def prefix_once(model, tokens: list[list[int]], pad: int) -> dict:
    """generate's inputs for prompts that open alike (the chat template and system prompt): the common opening
    runs once and its keys and values are copied to every row; each row is then the opening, its padding, and
    its own tokens (the padding masked, positions counted past it, as with left padding). With no common opening
    of 16 tokens or more (or off CPU), or a model whose cache cannot be shared (``cache_shareable``, said once), or
    generation settings that leave no room for it (``generation_shareable`` on the model's generation_config):
    plain left padding."""
    import torch

    common = 0
    shortest = min(len(t) for t in tokens)
    while common < shortest - 1 and all(t[common] == tokens[0][common] for t in tokens):
        common += 1
    if common < 16 or len(tokens) < 2 or model.device.type != "cpu":
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


def adapter_changes_nothing(model, tokenizer, text: str) -> bool:
    """True when the next-token distribution after ``text`` is the same with and without the adapter."""
    import torch

    batch = tokenizer([text], return_tensors="pt", add_special_tokens=False).to(model.device)
    with torch.no_grad():
        tuned = model(**batch).logits[0, -1].float().log_softmax(-1)
        with model.disable_adapter():
            base = model(**batch).logits[0, -1].float().log_softmax(-1)
    return bool(torch.allclose(tuned, base, atol=1e-6))


class TransformersEngine:
    """transformers' generate on the loaded model; the adapter is a PEFT adapter, switched off for the base."""

    def __init__(self, model, tokenizer, lora_dir: Path | None):
        if lora_dir:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(lora_dir))
        self.model, self.tokenizer, self.lora_dir = model.eval(), tokenizer, lora_dir

    def generate(self, texts: list[str], sampling: Sampling, adapter: bool) -> list[str]:
        if adapter or not self.lora_dir:
            return generate_hf(self.model, self.tokenizer, texts, sampling)
        with self.model.disable_adapter():
            return generate_hf(self.model, self.tokenizer, texts, sampling)

    def inert(self, text: str) -> bool:
        return bool(self.lora_dir) and adapter_changes_nothing(self.model, self.tokenizer, text)

    def follow(self, scratch: Path) -> None:
        """Generate with the adapter being trained, as it is now: the model is that adapter already."""


class VLLMEngine:
    """Unsloth's vLLM engine (``fast_generate`` on a model loaded with ``fast_inference=True``). The adapter rides
    along as a vLLM LoRA request, the base gets none. Prompts go in as token ids: chat-templated text already holds
    the template's BOS, and vLLM tokenizes text with special tokens, which would add a second one."""

    def __init__(self, model, tokenizer, lora_dir: Path | None):
        self.model, self.tokenizer, self.lora_dir = model, tokenizer, lora_dir
        self.lora_request = None
        if lora_dir:
            # Unsloth attaches load_lora to PEFT models only; this base model has just the engine
            from unsloth_zoo.vllm_utils import load_lora

            self.lora_request = load_lora(model, str(lora_dir))

    def generate(self, texts: list[str], sampling: Sampling, adapter: bool) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed,
        )
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        outputs = self.model.fast_generate(
            [{"prompt_token_ids": i} for i in ids],
            sampling_params=params,
            lora_request=self.lora_request if adapter else None,
            use_tqdm=False,
        )
        return [o.outputs[0].text for o in outputs]

    def inert(self, text: str) -> bool:
        return False  # vLLM gives no cheap look at the next-token distribution with and without the adapter

    def follow(self, scratch: Path) -> None:
        """Generate with the adapter being trained, as it is now: Unsloth's load_lora on the PEFT model reads its
        tensors into a new LoRA request, and writes the adapter's config into ``scratch`` (its save_directory)."""
        self.lora_request = self.model.load_lora(str(scratch), load_tensors=True)


def engine_for(plan):
    """The engine that generates as the plan says. TRL's server mode generates only for training: evaluation
    while training runs on the model being trained."""
    return VLLMEngine if plan.generator == "vllm" else TransformersEngine


class Pair:
    """One loaded base model, and the adapter switched on and off: never two copies. Without an adapter, the base
    alone (the embedded model unless ``model_name`` names another)."""

    def __init__(
        self, model_name: str | None, lora_dir: Path | None, max_seq_length: int = 2048, settings=None, toolset=None
    ):
        """``settings``: a run's own model settings (the dry run samples the base as the run would load it).
        ``toolset``: the tools to offer (grpo_cli/tools.py); by default those the adapter was trained with."""
        from grpo_cli import models, plan, tools
        from grpo_cli.config import DataSettings, ModelSettings

        self.lora_dir, self.manifest = find_adapter(lora_dir) if lora_dir else (None, {})
        trained_data = self.manifest.get("settings", {}).get("data", {})
        if toolset is None and (trained_data.get("tools") or trained_data.get("environment")):
            keys = ("tools", "environment", "max_tool_calling_iterations", "tool_timeout")
            models.unsloth_first()
            toolset = tools.resolve(DataSettings(**{k: trained_data[k] for k in keys if k in trained_data}))
        model_name = model_name or self.manifest.get("base_model") or models.EMBEDDED
        trained = self.manifest.get("settings", {}).get("model", {})
        settings = settings or ModelSettings(
            model=model_name,
            max_seq_length=max_seq_length,
            lora_rank=trained.get("lora_rank", 16),
            load_in_4bit=trained.get("load_in_4bit"),
            max_lora_rank=trained.get("max_lora_rank"),
        )
        # the base as the adapter was trained on it: the weights its run's plan loaded, not the ones it asked for
        self.plan = plan.for_inference(settings, self.manifest.get("plan"))
        model, self.tokenizer = models.load_model(settings, self.plan)
        self.plan = models.as_loaded(model, self.plan)
        expected = self.manifest.get("base_fingerprint")
        if expected and expected != fingerprint(model.config):
            raise GrpoError(
                f"adapter {self.lora_dir} was trained on {self.manifest.get('base_model')} "
                f"(config {expected}), not on {model_name} (config {fingerprint(model.config)}): "
                f"give --model {self.manifest.get('base_model')}"
            )
        self.toolset = toolset
        if toolset is not None:
            toolset.template, toolset.rollout_template = tools.carry_tools(self.tokenizer, model_name)
            print(toolset.template)
        self.engine = engine_for(self.plan)(model, self.tokenizer, self.lora_dir)

    def messages(self, questions: list[str], system_prompt: str | None) -> list[list[dict]]:
        prompt = self.manifest.get("system_prompt", "") if system_prompt is None else system_prompt
        return [([{"role": "system", "content": prompt}] if prompt else []) + [{"role": "user", "content": q}]
                for q in questions]  # fmt: skip

    def answer(self, prompts: list[list[dict]], sampling: Sampling, adapter: bool, rows=None) -> list[Conversation]:
        """Each prompt's completion, from the adapter or the base, through the tool loop when there are tools."""

        def generate(texts, s):
            return self.engine.generate(texts, s, adapter=adapter and bool(self.lora_dir))

        return converse(generate, self.tokenizer, prompts, sampling, self.toolset, rows)

    def texts(self, questions: list[str], system_prompt: str | None) -> list[str]:
        prompt = self.manifest.get("system_prompt", "") if system_prompt is None else system_prompt
        return chat_texts(self.tokenizer, questions, prompt)

    def base(self, texts: list[str], sampling: Sampling) -> list[str]:
        return self.engine.generate(texts, sampling, adapter=False)

    def tuned(self, texts: list[str], sampling: Sampling) -> list[str]:
        return self.engine.generate(texts, sampling, adapter=True)

    def warn_if_inert(self, text: str) -> str | None:
        if self.engine.inert(text):
            return (
                f"warning: adapter {self.lora_dir} changes nothing: the next-token distribution is identical without it"
            )
        return None
