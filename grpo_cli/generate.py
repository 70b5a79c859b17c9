"""Inference: the base model and the adapter on the same prompts, with the same template."""

import contextlib
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


def generate_hf(
    model, tokenizer, texts: list[str], sampling: Sampling, batch_size: int = 64, cpu_paths: bool = False
) -> list[str]:
    """transformers generation, left-padded batches, seeded so that runs repeat. ``cpu_paths``: the plan's CPU
    speed paths (grpo_cli/cpu_speed.py) apply; elsewhere generate runs as it is, the adapter unmerged."""
    import torch

    from grpo_cli import cpu_speed

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
        speed = cpu_speed.cpu_generation(model, len(tokens)) if cpu_paths else contextlib.nullcontext()
        with torch.no_grad(), speed:
            if cpu_paths:
                batch = cpu_speed.prefix_once(model, tokens, tokenizer.pad_token_id)
            else:
                batch = tokenizer.pad({"input_ids": tokens}, return_tensors="pt").to(model.device)
            ids = model.generate(
                **batch, max_new_tokens=sampling.max_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs
            )
        outputs += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return outputs


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

    def __init__(self, model, tokenizer, lora_dir: Path | None, plan):
        if lora_dir:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(lora_dir))
        self.model, self.tokenizer, self.lora_dir = model.eval(), tokenizer, lora_dir
        self.cpu_paths = plan.cpu_paths

    def generate(self, texts: list[str], sampling: Sampling, adapter: bool) -> list[str]:
        if adapter or not self.lora_dir:
            return generate_hf(self.model, self.tokenizer, texts, sampling, cpu_paths=self.cpu_paths)
        with self.model.disable_adapter():
            return generate_hf(self.model, self.tokenizer, texts, sampling, cpu_paths=self.cpu_paths)

    def inert(self, text: str) -> bool:
        return bool(self.lora_dir) and adapter_changes_nothing(self.model, self.tokenizer, text)

    def follow(self, scratch: Path) -> None:
        """Generate with the adapter being trained, as it is now: the model is that adapter already."""

    def rest(self) -> None:
        """Nothing holds memory between generations."""


class VLLMEngine:
    """Unsloth's vLLM engine (``fast_generate`` on a model loaded with ``fast_inference=True``). The adapter rides
    along as a vLLM LoRA request, the base gets none. Prompts go in as token ids: chat-templated text already holds
    the template's BOS, and vLLM tokenizes text with special tokens, which would add a second one."""

    def __init__(self, model, tokenizer, lora_dir: Path | None, plan):
        self.model, self.tokenizer, self.lora_dir = model, tokenizer, lora_dir
        self.standby = plan.standby
        self.lora_request = None
        if lora_dir:
            # Unsloth attaches load_lora to PEFT models only; this base model has just the engine
            from unsloth_zoo.vllm_utils import load_lora

            self.lora_request = load_lora(model, str(lora_dir))

    def generate(self, texts: list[str], sampling: Sampling, adapter: bool) -> list[str]:
        from vllm import SamplingParams

        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        # a seed a request: vLLM draws a seeded request from its own generator, so one seed for all would give a
        # prompt repeated G times (the dry run's groups) G identical completions
        params = [
            SamplingParams(
                temperature=0.0 if sampling.greedy else sampling.temperature,
                top_p=1.0 if sampling.greedy else sampling.top_p,
                max_tokens=sampling.max_tokens,
                seed=sampling.seed + i,
            )
            for i in range(len(ids))
        ]
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

    def rest(self) -> None:
        """Back to sleep after an evaluation while training, under standby. TRL puts the engine to sleep after each
        of its generations (``VLLMGeneration.generate``: ``self.llm.sleep(level=2)``, on Unsloth's engine), and
        Unsloth wakes a sleeping engine before any generate: an evaluation's generate leaves it awake, holding its
        cache's memory through the optimizer steps until TRL's next generation."""
        if self.standby:
            self.model.vllm_engine.sleep(level=2)


def engine_for(plan):
    """The engine that generates as the plan says. TRL's server mode generates only for training: evaluation
    while training runs on the model being trained."""
    return VLLMEngine if plan.generator == "vllm" else TransformersEngine


class Pair:
    """One loaded base model, and the adapter switched on and off: never two copies. Without an adapter, the base
    alone (the embedded model unless ``model_name`` names another)."""

    def __init__(
        self,
        model_name: str | None,
        lora_dir: Path | None,
        max_seq_length: int = 2048,
        settings=None,
        toolset=None,
        trained: dict | None = None,
    ):
        """``settings`` and ``trained``: a run's own model settings and plan (the dry run samples the base as the
        run would load it, 16-bit where its plan trains a 16-bit base).
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
        saved = self.manifest.get("settings", {}).get("model", {})
        settings = settings or ModelSettings(
            model=model_name,
            max_seq_length=saved.get("max_seq_length", max_seq_length),  # the context it trained with
            lora_rank=saved.get("lora_rank", 16),
            load_in_4bit=saved.get("load_in_4bit"),
            max_lora_rank=saved.get("max_lora_rank"),
            random_state=saved.get("random_state", 3407),
        )
        # the base as the adapter was trained on it: the weights its run's plan loaded, not the ones it asked for
        self.plan = plan.for_inference(settings, self.manifest.get("plan") or trained)
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
        self.engine = engine_for(self.plan)(model, self.tokenizer, self.lora_dir, self.plan)

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
