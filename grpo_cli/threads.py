"""CPU threads: how many torch uses and how its OpenMP threads wait, for the cores this process may use and the
load on them.

OpenMP's threads spin at every barrier before they sleep. Alone on the machine that is fastest; beside a busy
process one of them is descheduled and the others spin for it at each of the hundreds of small operations a
decoded token takes, which made a step many times slower. So the spin is kept short (libgomp reads it once, when
torch loads it: ``prepare`` runs before that), and while the run goes on ``Adaptive`` watches how much of its cores
other processes take and gives torch one thread fewer for each core they hold, and the threads back when they go.
A user's own OMP_* and GOMP_* variables win.
"""

import math
import os
import time
from pathlib import Path

SPIN = "10000"  # libgomp's spins before a waiting thread sleeps (about 0.1 ms; its default is 300000, about 3 ms)
USER_KEYS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may run on: its CPU affinity, within a cgroup CPU quota where one is set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def share(cores: int, processes: int) -> int:
    """Each process's threads when ``processes`` run on this machine (under a launcher): never more threads in all
    than cores.

    >>> share(2, 1), share(2, 2), share(16, 3), share(2, 4)
    (2, 1, 5, 1)
    """
    return max(1, cores // max(1, processes))


def launched(environ=os.environ) -> bool:
    """Started by torchrun or accelerate launch, which set OMP_NUM_THREADS themselves (1, or their own default)."""
    return "LOCAL_WORLD_SIZE" in environ


def prepare(environ=os.environ) -> str:
    """Before torch loads: the thread count (the cores usable here, shared with a launcher's other processes on
    this machine) and the short spin, unless the user set their own (GRPO_NUM_THREADS under a launcher, whose
    OMP_NUM_THREADS is its own). Returns what was chosen, for the plan."""
    given = [key for key in USER_KEYS if key in environ and not (key == "OMP_NUM_THREADS" and launched(environ))]
    if "GRPO_NUM_THREADS" in environ:
        environ["OMP_NUM_THREADS"] = environ["GRPO_NUM_THREADS"]
        given.insert(0, "GRPO_NUM_THREADS")
    elif "OMP_NUM_THREADS" not in given:
        environ["OMP_NUM_THREADS"] = str(share(usable_cores(), int(environ.get("LOCAL_WORLD_SIZE", "1"))))
    if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(given):
        environ["GOMP_SPINCOUNT"] = SPIN
    environ["GRPO_THREADS_GIVEN"] = ",".join(given)
    return describe(environ)


def fixed(environ=os.environ) -> bool:
    """The thread count is the user's: kept as it is while the run goes on."""
    return bool({"OMP_NUM_THREADS", "GRPO_NUM_THREADS"} & set(environ.get("GRPO_THREADS_GIVEN", "").split(",")))


def describe(environ=os.environ) -> str:
    """The threads and waiting as set, in a few words."""
    given = [k for k in environ.get("GRPO_THREADS_GIVEN", "").split(",") if k]
    policy = environ.get("OMP_WAIT_POLICY")
    wait = policy.lower() if policy else f"spin {environ.get('GOMP_SPINCOUNT', 'as libgomp sets it')}"
    count = environ.get("OMP_NUM_THREADS")
    threads = f"{count} thread{'s' * (count != '1')}" if count else "torch's threads"
    adapted = ", fewer while other processes hold cores" if count and count != "1" and not fixed(environ) else ""
    return f"{threads}{adapted}, {wait}" + (f" ({', '.join(given)} as given)" if given else "")


def cpu_ticks(cores: set[int], stat: str | None = None) -> tuple[int, int]:
    """(busy, all) clock ticks of these cores since boot, from /proc/stat; steal (the host running another guest
    on them) counts as busy."""
    busy = total = 0
    for line in (stat if stat is not None else Path("/proc/stat").read_text()).splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cores:
            continue
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in values[:8])
        busy += user + nice + system + irq + softirq + steal
        total += user + nice + system + idle + iowait + irq + softirq + steal
    return busy, total


def own_ticks(stat: str | None = None) -> int:
    """This process's user and system clock ticks (all its threads), from /proc/self/stat."""
    text = stat if stat is not None else Path("/proc/self/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


class Adaptive:
    """Every ``every`` seconds at most (called from the thread that runs torch, between operations): how many cores
    other processes held since the last look, and torch's thread count set to the cores left (at least one), up to
    the count chosen at start. Off where the user set OMP_NUM_THREADS."""

    def __init__(self, every: float = 0.5, most: int | None = None):
        import torch

        self.every = every
        self.most = most or torch.get_num_threads()
        self.cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        # under a cgroup CPU quota /proc/stat counts the whole host, not what competes within the quota: off
        self.on = not fixed() and self.most > 1 and usable_cores() == len(self.cores)
        self.at = time.monotonic()
        self.last = self.sample()
        self.changes = 0

    def sample(self) -> tuple[int, int, int]:
        try:
            return (*cpu_ticks(self.cores), own_ticks())
        except (OSError, ValueError):
            self.on = False
            return (0, 0, 0)

    def __call__(self, *args, **kwargs) -> None:
        if not self.on or time.monotonic() - self.at < self.every:
            return
        now = self.sample()
        busy, total, own = (b - a for a, b in zip(self.last, now))
        self.last, self.at = now, time.monotonic()
        if total <= 0:
            return
        others = max(0.0, (busy - own) / total * len(self.cores))  # cores other processes held
        threads = max(1, min(self.most, round(len(self.cores) - others)))
        import torch  # not kept on self: a model with this hook can still be deep-copied

        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            self.changes += 1
