"""Run model-written Python in a sandbox, and judge its tests from outside the program's process.

Each program runs in a child of ``bwrap`` (https://github.com/containers/bubblewrap, the sandbox of Flatpak), as
this user, or as ``nobody`` when the trainer runs as root (the kernel exempts root's uid from the process limit,
even in a user namespace without capabilities), with:

- namespaces of its own: user (no capabilities, uid 65534 inside, no further user namespaces), PID (nothing it
  starts outlives the call: its first process, the judge, is PID 1 there, and when it ends the kernel kills the
  rest; the kernel drops the signals sent to it from inside that it has no handler for, and it ignores ``SIGINT``,
  the one Python handles; no reaper of bwrap's own is left behind), network (a loopback that is down: no
  connection anywhere, not even to 127.0.0.1 or an abstract socket of the host), mount, IPC (no SysV object of the
  host), UTS, cgroup;
- a new session, so it cannot signal the trainer's process group nor push keys into its terminal, and a fresh
  session keyring;
- a seccomp filter (``seccomp_filter``): ``keyctl``, ``add_key``, ``request_key`` (no keyring, the user's own
  included), ``shmget``, ``shmat``, ``msgget``, ``semget`` (no SysV memory, which belongs to no process),
  ``io_uring_*``, Linux AIO (``io_setup``, ``io_submit``, ``io_getevents``, ``io_pgetevents``, ``io_cancel``,
  ``io_destroy``: its contexts count against the host's ``fs.aio-max-nr``), ``ptrace``,
  ``process_vm_readv``/``writev``, ``pidfd_getfd`` and ``fallocate`` fail with EPERM; a system call through
  another architecture's table (32-bit) kills the process, an x32 one fails;
- a file system of its own: ``/usr`` (and ``/bin``, ``/lib``...), the Python installation it runs on (the
  trainer's own, or the system's where nobody cannot reach that one), ``/etc/ld.so.cache``, a fresh ``/proc`` and
  a minimal ``/dev``, all read-only, and two small private tmpfs folders, ``/tmp`` (its working folder and
  ``HOME``) and ``/dev/shm``, the only places it can write. The home folders, ``/root``, the rest of ``/etc``, the
  project, the data, ``/var``, ``/run``, ``/sys`` and the GPUs are not there at all;
- standard input a sealed memory file, standard output and error pipes the trainer reads up to ``file_bytes``
  each: nothing it prints lands on a disk; a ``Result`` keeps them as bytes (standard error's first
  ``STDERR_KEPT`` only) and decodes them when read, so a batch of results holds at most ``file_bytes`` and 64 KiB
  each;
- an empty environment (PATH, HOME, TMPDIR and LANG only: no tokens, no ``HF_*`` or ``WANDB_*``);
- limits, set inside the sandbox before the program runs: wall time (the whole namespace is killed), CPU time,
  address space per process, processes and threads, file size, open files, no core dumps;
- a budget for all the sandboxes of a run together (``Budget``): where root may create cgroup v1 ``memory`` and
  ``pids`` groups, each sandbox runs in a group of its own (``memory_bytes`` for all its processes together,
  ``processes``) inside the run's group (``workers`` times that); elsewhere the per-process limits are scaled so
  that processes x memory x sandboxes at a time fit in half the machine's memory. The plan line says which.

Tests are judged outside the program's process (grpo_cli/judge.py). The judge, the sandbox's first process, forks
the candidate before it reads the tests (the candidate closes the verdict pipe and the task's descriptor: its memory
never holds the tests), then compiles and runs the row's ``setup`` and tests in a namespace and with builtins of its
own, and only then sends the candidate ``setup`` and the model's code, which it runs in its own namespace before it
answers calls. The tests' ``candidate(...)`` (and the names the asserts call) are the judge's stubs that send the
arguments to the candidate and get back plain data only: marshal's exact ``None``, ``bool``, ``int``, ``float``,
``complex``, ``str``, ``bytes``, ``tuple``, ``list``, ``dict``, ``set``, ``frozenset`` (no subclass, no code
object), checked by the judge; anything else comes back as an opaque handle that can only be passed back to the
candidate (its truth value raises). An exception the candidate raises is raised in the judge as the builtin
exception of that name (``RuntimeError`` for any other, and for ``StopIteration``, which would end a test's loop
over ``map(candidate, ...)`` early). Helpers of the task's prompt that the tests use are the
judge's own copies (one that ``setup`` does not define is a ``NameError`` in the judge). The judge is not dumpable (the candidate, same uid, cannot open its ``/proc`` files, memory or
descriptors), and it reports on a pipe the candidate never holds; the trainer parses that report strictly
(``parse_verdict``). Arguments are copied: a test that reads back an argument the function changed in place sees
it unchanged.

What it does not isolate: the kernel itself (a kernel exploit escapes any namespace or filter), CPU side channels
and the sharing of CPU time, caches and memory bandwidth, world-readable facts in ``/proc`` (``cpuinfo``,
``meminfo``, the load, the kernel's version and command line), the read-only files of ``/usr`` and of the Python
installation (its site-packages included). Without a cgroup, memory summed over processes is bounded only by the
scaled limits. The judge reads the candidate's answers with ``marshal.loads``, which checks its input's bounds but
is not documented as safe against crafted data: a crash there fails the test, nothing more is known.

Where bwrap is missing or the kernel allows no user namespaces, ``resolve()`` gives a ``problem`` naming what is
missing, and running model code refuses with it, unless ``mode="rlimits"`` is asked for: then the program runs
with the judge, the filter, the keyring, the limits and the budget above, an empty environment and a private
working folder, but in the host's namespaces. It then sees the file system (and may write what its user may: as
nobody under root, little), the network and the processes of its user (and may signal them, other sandboxes'
included; as the trainer's own user, it may write the trainer's memory through /proc); without a cgroup, a
process that leaves the session (``setsid``) outlives the call and the process limit counts every process of its
user on the host. ``line()`` says so. ``resolve()`` tries the sandbox once before any model code runs, and
refuses it too if the process limit does not hold there.
"""

import ast
import atexit
import builtins
import concurrent.futures
import dataclasses
import fcntl
import functools
import itertools
import json
import marshal
import os
import platform
import pwd
import queue
import re
import secrets
import selectors
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from grpo_cli.errors import GrpoError

MODES = ("namespaces", "rlimits")
INSTALL = "apt-get install bubblewrap (dnf/pacman/apk: bubblewrap)"
SANDBOX_UID = 65534  # nobody, inside the sandbox's user namespace
CGROUP_ROOT = Path("/sys/fs/cgroup")
MIN_PROCESS_BYTES = 256 << 20  # the least address space the scaled limits give a process: Python and its libraries


class SandboxError(GrpoError):
    """The sandbox itself failed or is missing: never the program's fault, so never a score."""


@dataclasses.dataclass(frozen=True)
class Limits:
    wall_seconds: float = 5.0
    cpu_seconds: int = 5
    memory_bytes: int = 1 << 30  # address space per process; with a cgroup, also all of a sandbox's processes
    processes: int = 32  # threads included
    file_bytes: int = 4 << 20  # any file written, and each captured stream
    open_files: int = 64
    tmp_bytes: int = 64 << 20  # each of /tmp and /dev/shm

    def rlimits(self) -> dict:
        return {
            "RLIMIT_CPU": self.cpu_seconds,
            "RLIMIT_AS": self.memory_bytes,
            "RLIMIT_NPROC": self.processes,
            "RLIMIT_FSIZE": self.file_bytes,
            "RLIMIT_NOFILE": self.open_files,
            "RLIMIT_CORE": 0,
        }


@dataclasses.dataclass(frozen=True)
class Program:
    """What to run. ``code`` alone runs as ``__main__`` on ``stdin``; with ``test`` and ``entry_point`` (HumanEval)
    the judge runs ``setup`` and the test, then ``check`` on the candidate's ``entry_point``; with ``asserts``
    (MBPP) it runs ``setup``, then each assert alone against the candidate, and counts those that pass."""

    code: str
    stdin: str = ""
    setup: str = ""
    test: str | None = None
    entry_point: str | None = None
    asserts: tuple[str, ...] = ()


STDERR_KEPT = 1 << 16  # the bytes of standard error a Result keeps: the rest is read and dropped


@dataclasses.dataclass(frozen=True)
class Result:
    """What a program did. Its output is kept as bytes (standard output up to ``file_bytes``, standard error's first
    ``STDERR_KEPT``) and decoded, invalid UTF-8 replaced, each time ``stdout`` or ``stderr`` is read: text of a
    few wide characters takes up to four times its bytes, and rewards hold a batch's results together."""

    returncode: int | None  # None: killed at the wall-time limit
    output: bytes
    errors: bytes
    seconds: float
    passed: bool = False  # tests: check() returned; asserts: every one passed
    asserts_passed: int = 0

    @property
    def stdout(self) -> str:
        return self.output.decode("utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.errors.decode("utf-8", errors="replace")

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


# --- The seccomp filter ---------------------------------------------------------------------------------------------

# System calls that fail with EPERM, by architecture: (AUDIT_ARCH, {name: number})
DENIED = {
    "x86_64": (0xC000003E, {
        "keyctl": 250, "add_key": 248, "request_key": 249, "shmget": 29, "shmat": 30, "msgget": 68, "semget": 64,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "ptrace": 101,
        "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_getfd": 438, "fallocate": 285,
        "io_setup": 206, "io_destroy": 207, "io_getevents": 208, "io_submit": 209, "io_cancel": 210,
        "io_pgetevents": 333,
    }),
    "aarch64": (0xC00000B7, {
        "keyctl": 219, "add_key": 217, "request_key": 218, "shmget": 194, "shmat": 196, "msgget": 186,
        "semget": 190, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "ptrace": 117,
        "process_vm_readv": 270, "process_vm_writev": 271, "pidfd_getfd": 438, "fallocate": 47,
        "io_setup": 0, "io_destroy": 1, "io_submit": 2, "io_cancel": 3, "io_getevents": 4, "io_pgetevents": 292,
    }),
}  # fmt: skip
X32_SYSCALL_BIT = 0x40000000


def seccomp_filter(machine: str | None = None) -> bytes:
    """The classic BPF program the judge installs (``prctl(PR_SET_SECCOMP)``) before anything else runs: the
    architecture checked first (another one kills: its numbers differ), x32 calls refused, then the denied calls.
    Empty where the architecture is not in ``DENIED``."""
    machine = machine or platform.machine()
    if machine not in DENIED:
        return b""
    arch, numbers = DENIED[machine]
    ld_abs, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JGE|K, RET|K
    allow, deny, kill = 0x7FFF0000, 0x00050000 | 1, 0x80000000  # SECCOMP_RET_ALLOW, ERRNO|EPERM, KILL_PROCESS
    checks = ([(jge, X32_SYSCALL_BIT)] if machine == "x86_64" else []) + [(jeq, n) for n in numbers.values()]
    # 0: load arch, 1: check it, 2: load nr, 3..: checks, then allow, deny, kill
    n = len(checks)
    prog = [(ld_abs, 0, 0, 4), (jeq, 0, n + 3, arch), (ld_abs, 0, 0, 0)]
    prog += [(code, n - i, 0, k) for i, (code, k) in enumerate(checks)]  # jt: to deny, past the rest and allow
    prog += [(ret, 0, 0, allow), (ret, 0, 0, deny), (ret, 0, 0, kill)]
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


def keyctl_number(machine: str | None = None) -> int:
    return DENIED.get(machine or platform.machine(), (0, {}))[1].get("keyctl", -1)


# --- The judge ------------------------------------------------------------------------------------------------------

# The judge program (grpo_cli/judge.py), run by the sandbox's Python from its source: it is never imported here.
RUNNER = (Path(__file__).with_name("judge.py")).read_text()


@functools.lru_cache(maxsize=1024)
def judged_names(test: str | None, asserts: tuple[str, ...]) -> dict:
    """What the judge puts in its namespace for the tests, where ``setup`` and the test did not define it: the
    modules of the standard library the tests use only as ``module.attribute`` (``math.isclose`` in MBPP's asserts,
    which the solution imported), and stubs that call the candidate for every other free name of the asserts; and
    the modules the tests import, which the judge imports before any model code runs. A HumanEval ``test`` gets no
    stub but its entry point's (the judge makes that one): a helper it calls that ``setup`` did not define is a
    ``NameError`` in the judge, never the candidate's function of that name.

    >>> judged_names(None, ("assert math.isclose(area(1), 3.14, rel_tol=0.01)",))
    {'modules': ['math'], 'remote': ['area'], 'imports': []}
    >>> judged_names("def check(candidate):\\n    assert poly(candidate([1]), 0) == 0\\n", ())
    {'modules': [], 'remote': [], 'imports': []}
    """
    loads, bare, imports, called = set(), set(), set(), set()
    for i, source in enumerate([test or "", *asserts]):
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        bases = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                loads.add(node.id)
                if i:  # an assert's
                    called.add(node.id)
                if id(node) not in bases:
                    bare.add(node.id)  # called or passed as it is: not a module
            elif isinstance(node, ast.Import):
                imports.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imports.add(node.module)
    loads -= set(dir(builtins))
    modules = {name for name in loads - bare if name.split(".")[0] in sys.stdlib_module_names}
    remote = (called & loads) - modules
    return {"modules": sorted(modules), "remote": sorted(remote), "imports": sorted(imports)}


@functools.lru_cache(maxsize=1024)
def setup_imports(setup: str) -> list[str]:
    """The standard modules the row's setup (the prompt's code, which the model sees) imports: the judge imports
    them before it forks the candidate, so that neither pays for them twice.

    >>> setup_imports("from typing import List\\nimport math, numpy\\n")
    ['math', 'typing']
    """
    try:
        tree = ast.parse(setup)
    except (SyntaxError, ValueError):
        return []
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return sorted(n for n in names if n.split(".")[0] in sys.stdlib_module_names)


VERDICT = re.compile(rb"R(?:P([0-9]{1,9})\n)?")


def parse_verdict(data: bytes) -> tuple[bool, int | None]:
    """What the judge said on its pipe: whether it reached the program, and how many tests passed (None: it did not
    finish). Anything but its exact words, ASCII digits included, reads as not reached.

    >>> parse_verdict(b"RP3\\n"), parse_verdict(b"R"), parse_verdict("RP\\u00b3\\n".encode()), parse_verdict(b"")
    ((True, 3), (True, None), (False, None), (False, None))
    """
    match = VERDICT.fullmatch(data)
    if match is None:
        return False, None
    return True, None if match[1] is None else int(match[1])


# --- The budget of a run --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Budget:
    """Memory and processes for all the sandboxes of a run together. With ``cgroup`` (a group's name under
    ``CGROUP_ROOT``'s v1 ``memory`` and ``pids`` hierarchies, made by ``Budget.make``), each sandbox runs in a group
    of its own with ``limits.memory_bytes`` and ``limits.processes`` plus its own four (the sh, bwrap twice, the
    judge), and the run's group holds ``workers`` of those; without, the limits were scaled to fit (``scaled``)."""

    memory_bytes: int
    processes: int
    cgroup: str | None = None
    machine_bytes: int = 0

    OVERHEAD = 4  # processes of a sandbox's own around the program (bwrap, the judge) and some room
    _count = itertools.count()

    @classmethod
    def make(cls, limits: Limits, workers: int, cgroup: bool = True) -> tuple["Budget", Limits]:
        """The run's cgroup where root may make one (and ``cgroup``: a sandbox joins its group as root, before
        setpriv makes it nobody), else the limits scaled to the machine; the limits to use."""
        memory = workers * limits.memory_bytes
        processes = workers * (limits.processes + cls.OVERHEAD)
        name = f"grpo-sandbox-{os.getpid()}-{next(cls._count)}"
        if cgroup and _make_group(name, memory, processes):
            atexit.register(_remove_group, name)
            return cls(memory, processes, name, _machine_bytes()), limits
        machine = _machine_bytes()
        allowance = machine // 2
        if workers * limits.processes * limits.memory_bytes > allowance:
            each = max(allowance // (workers * limits.processes), MIN_PROCESS_BYTES)
            limits = dataclasses.replace(limits, memory_bytes=min(each, limits.memory_bytes))
            if workers * limits.processes * limits.memory_bytes > allowance:
                fit = max(allowance // (workers * limits.memory_bytes), 4)
                limits = dataclasses.replace(limits, processes=min(fit, limits.processes))
        return cls(workers * limits.processes * limits.memory_bytes, workers * limits.processes, None, machine), limits

    def line(self, limits: Limits) -> str:
        if self.cgroup:
            return (
                f"cgroup: {limits.memory_bytes >> 20} MiB and {limits.processes} processes a sandbox, "
                f"{self.memory_bytes >> 20} MiB and {self.processes} processes in all"
            )
        return (
            f"no cgroup, limits scaled: {limits.processes} processes x {limits.memory_bytes >> 20} MiB a sandbox, "
            f"{self.memory_bytes >> 30} GiB in all of the machine's {self.machine_bytes >> 30} GiB"
        )

    def enter(self, limits: Limits) -> tuple[list[str], str | None]:
        """A group for one sandbox (a free one of the run's, else a new one: making and removing memory groups costs
        the kernel milliseconds), and the command that puts itself there before it runs the rest."""
        if not self.cgroup:
            return [], None
        free = _free_groups.setdefault(self.cgroup, queue.SimpleQueue())
        try:
            name = free.get_nowait()
        except queue.Empty:
            name = f"{self.cgroup}/{next(self._count)}"
            if not _make_group(name, limits.memory_bytes, limits.processes + self.OVERHEAD):
                raise SandboxError(f"cannot make the sandbox's cgroup {name} under {CGROUP_ROOT}") from None
            atexit.register(_remove_group, name)  # before the run's group: atexit runs last in, first out
        procs = [str(CGROUP_ROOT / kind / name / "cgroup.procs") for kind in ("memory", "pids")]
        join = 'echo $$ > "$1" && echo $$ > "$2" && shift 2 && exec "$@"'
        return ["/bin/sh", "-c", join, "sh", *procs], name

    @staticmethod
    def leave(name: str | None) -> None:
        """Kill whatever is still in the sandbox's group (a daemon of rlimits mode), then free the group for the
        next sandbox; one that cannot be emptied is dropped."""
        if name is None:
            return
        procs = CGROUP_ROOT / "pids" / name / "cgroup.procs"
        for _ in range(100):
            try:
                pids = [int(p) for p in procs.read_text().split()]
            except (OSError, ValueError):
                return
            if not pids:
                _free_groups[name.rsplit("/", 1)[0]].put(name)
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.001)


_free_groups: dict[str, queue.SimpleQueue] = {}  # the run's group -> its sandboxes' groups that are free


def _machine_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _make_group(name: str, memory: int, processes: int) -> bool:
    """A v1 memory and pids group ``name`` with those limits; False where this process may not make one."""
    if os.geteuid() != 0 or not all((CGROUP_ROOT / kind / "cgroup.procs").exists() for kind in ("memory", "pids")):
        return False
    settings = {
        "memory": [("memory.limit_in_bytes", memory), ("memory.memsw.limit_in_bytes", memory)],
        "pids": [("pids.max", processes)],
    }
    try:
        for kind, files in settings.items():
            folder = CGROUP_ROOT / kind / name
            folder.mkdir()
            for file, value in files:
                if file == "pids.max" or (folder / file).exists():  # memsw: only where swap is accounted
                    (folder / file).write_text(str(value))
    except OSError:
        _remove_group(name)
        return False
    return True


def _remove_group(name: str) -> None:
    for kind in ("memory", "pids"):
        try:
            (CGROUP_ROOT / kind / name).rmdir()
        except OSError:
            pass


# --- Where the sandbox's Python comes from --------------------------------------------------------------------------


def _nobody() -> tuple[int, int] | None:
    """Run as root, the sandbox runs as nobody: the kernel does not apply the process limit to root's uid, even
    inside a user namespace without capabilities. Root inside a user namespace (a container's) that maps it to
    another uid needs no switch."""
    if os.geteuid() != 0:
        return None
    try:
        ranges = [line.split() for line in Path("/proc/self/uid_map").read_text().splitlines()]
    except OSError:
        ranges = [["0", "0", "1"]]
    if not any(inside == "0" and outside == "0" for inside, outside, _ in ranges):
        return None
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return SANDBOX_UID, SANDBOX_UID


def _roots(exe: str, prefixes: list[str]) -> list[str]:
    """The folders an interpreter needs that ``/usr`` does not already hold."""
    roots = []
    for folder in [*prefixes, os.path.dirname(os.path.dirname(exe))]:
        folder = os.path.realpath(folder)
        if not any(folder == r or folder.startswith(r + "/") for r in ["/usr", *roots]):
            roots.append(folder)
    return roots


def _open_to_others(path: str) -> bool:
    """Whether any user may reach ``path``: every folder above it searchable by others."""
    parts = Path(path).parts
    try:
        return all(os.stat(Path(*parts[:i])).st_mode & stat.S_IXOTH for i in range(1, len(parts) + 1))
    except OSError:
        return False


def _interpreter(others: bool) -> tuple[str, list[str]] | None:
    """The Python the trainer runs on (a virtual environment's base) and the folders it needs; when the sandbox runs
    as another user (``others``) and cannot reach it (pyenv under /root), the system's Python; else None."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    candidates = [(exe, _roots(exe, [sys.base_prefix, sys.base_exec_prefix]))]
    for path in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(path):
            system = os.path.realpath(path)
            candidates.append((system, _roots(system, [])))
    for exe, roots in candidates:
        if not others or all(_open_to_others(p) for p in [exe, *roots]):
            return exe, roots
    return None


def bwrap_command(python: str, roots: list[str], limits: Limits) -> list[str]:
    """bwrap's arguments up to the command: an empty root with the read-only system folders, Python and the
    private tmpfs folders, then everything else read-only."""
    cmd = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--as-pid-1", "--uid", str(SANDBOX_UID),
           "--gid", str(SANDBOX_UID), "--die-with-parent", "--new-session", "--clearenv", "--hostname", "sandbox",
           "--ro-bind", "/usr", "/usr"]  # fmt: skip
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):  # merged /usr: symlinks; else folders
        path = Path("/", name)
        if path.is_symlink():
            cmd += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            cmd += ["--ro-bind", str(path), str(path)]
    cmd += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for root in roots:
        cmd += ["--ro-bind", root, root]
    size = str(limits.tmp_bytes)
    cmd += ["--proc", "/proc", "--dev", "/dev", "--size", size, "--tmpfs", "/dev/shm", "--size", size,
            "--tmpfs", "/tmp", "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp"]  # fmt: skip
    for name, value in _environment("/tmp").items():
        cmd += ["--setenv", name, value]
    return cmd


def _environment(home: str) -> dict:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}


def _sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", name.replace(".", "/")).read_text().strip()
    except OSError:
        return None


def _missing_namespaces() -> str:
    """Which kernel setting keeps this user from creating namespaces, as far as /proc/sys says."""
    if _sysctl("user.max_user_namespaces") == "0":
        return "user namespaces are off (sysctl user.max_user_namespaces = 0)"
    if os.geteuid() != 0 and _sysctl("kernel.unprivileged_userns_clone") == "0":
        return "unprivileged user namespaces are off (sysctl kernel.unprivileged_userns_clone = 0)"
    if os.geteuid() != 0 and _sysctl("kernel.apparmor_restrict_unprivileged_userns") == "1":
        return "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns = 1)"
    return "the kernel or a security policy refuses the namespaces"


# --- The sandbox ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sandbox:
    """How model code runs on this machine, decided once (``resolve``): the mechanism, or why there is none."""

    mode: str
    python: str
    prefix: tuple[str, ...]  # the command before the interpreter: setpriv (as root), then bwrap and its arguments
    limits: Limits
    problem: str | None = None
    workers: int = 1
    identity: tuple[int, int] | None = None  # (uid, gid) to run as: nobody when the trainer is root
    budget: Budget | None = None
    seccomp: bytes = dataclasses.field(default_factory=seccomp_filter, repr=False)

    def line(self) -> str:
        if self.problem:
            return f"none: {self.problem}"
        budget = f"; {self.budget.line(self.limits)}" if self.budget else ""
        closed = "judged outside the program, keyring, SysV and io_uring closed" if self.seccomp else (
            "judged outside the program, no seccomp filter on this architecture"
        )  # fmt: skip
        if self.mode == "rlimits":
            who = "nobody" if self.identity else "this user"
            daemons = "" if self.budget and self.budget.cgroup else (
                f", whose daemons may outlive the call and whose process limit counts all of {who}'s processes"
            )  # fmt: skip
            return (
                f"rlimits only, as asked: model code runs as {who} with resource limits, an empty environment "
                f"and a private working folder, and sees the file system, the network and {who}'s processes"
                f"{daemons}; {closed}{budget}"
            )
        return (
            f"bubblewrap namespaces (user, pid, net, mount, ipc){' as nobody' if self.identity else ''}, "
            f"read-only system, private /tmp, {closed}; "
            f"{self.limits.wall_seconds:g}s, {self.limits.memory_bytes >> 20} MiB, {self.limits.processes} processes; "
            f"{self.workers} at a time{budget}"
        )

    def run(self, program: Program) -> Result:
        """Run one program in a fresh sandbox; everything it started is gone when this returns. Raises
        SandboxError when the sandbox itself failed (the judge never reached the program)."""
        if self.problem:
            raise SandboxError(f"model code cannot run: {self.problem}")
        script = program.test is None and not program.asserts
        box = {
            "limits": self.limits.rlimits(),
            "seccomp": self.seccomp,
            "keyctl": keyctl_number(),
            "tag": secrets.token_hex(8),
            "answer_bytes": self.limits.file_bytes,
            "script": script,
            "preload": [] if script else setup_imports(program.setup),
        }
        task = {  # read by the judge after the candidate is forked: never in the candidate's memory
            "code": program.code,
            "setup": program.setup,
            "test": program.test,
            "entry_point": program.entry_point,
            "asserts": list(program.asserts),
            **({} if script else judged_names(program.test, program.asserts)),
        }
        work = tempfile.mkdtemp(prefix="grpo-sandbox-") if self.mode == "rlimits" else None
        if work and self.identity:
            os.chown(work, *self.identity)
        fds = []
        group = None
        try:
            box_fd = _sealed(marshal.dumps(box, 4), "grpo-box")  # marshal: no import to pay for in the sandbox
            fds.append(box_fd)
            task_fd = _sealed(marshal.dumps(task, 4), "grpo-task")
            fds.append(task_fd)
            stdin = _sealed(program.stdin.encode(), "grpo-stdin")
            fds.append(stdin)
            verdict_r, verdict_w = os.pipe()
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            fds += [verdict_r, verdict_w, out_r, out_w, err_r, err_w]
            join, group = self.budget.enter(self.limits) if self.budget else ([], None)
            started = time.monotonic()
            returncode, out, err = self._spawn(join, (box_fd, task_fd), verdict_w, stdin, out_r, err_r, fds, work)
            seconds = time.monotonic() - started
            _close(fds, verdict_w)
            reached, count = parse_verdict(_read_upto(verdict_r, 64))  # every writer is gone
        finally:
            Budget.leave(group)
            for fd in list(fds):
                _close(fds, fd)
            if work:
                shutil.rmtree(work, ignore_errors=True)
        if not reached:
            said = next((line for line in err.decode(errors="replace").splitlines() if line.strip()), "no output")
            what = f"did not start within {self.limits.wall_seconds:g}s" if returncode is None else "failed"
            raise SandboxError(f"the sandbox {what} before running the program ({said[:200]})")
        if returncode == 0 and count is not None:
            asserts = len(program.asserts)
            passed = count == 1 if program.test is not None else count == asserts
            return Result(returncode, out, err, seconds, passed, min(count, asserts))
        return Result(returncode, out, err, seconds)

    def run_all(self, programs: list[Program]) -> list[Result]:
        """Run the programs, ``workers`` at a time; results in order."""
        if len(programs) <= 1 or self.workers == 1:
            return [self.run(p) for p in programs]
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(self.workers, len(programs)))
        try:
            futures = [pool.submit(self.run, p) for p in programs]
            return [f.result() for f in futures]
        finally:  # a reward interrupted at its time limit leaves no queued sandbox behind
            pool.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, join, tasks, verdict_w, stdin, out_r, err_r, fds, work) -> tuple[int | None, bytes, bytes]:
        """Start the sandbox, read its output while it runs, kill it at the wall-time limit; the exit status (None
        if killed), stdout and stderr. The write ends of the pipes (the ones after ``out_r`` and ``err_r`` in
        ``fds``) are closed here, once the sandbox holds them."""
        out_w, err_w = fds[fds.index(out_r) + 1], fds[fds.index(err_r) + 1]
        info_r, info_w = os.pipe() if self.mode == "namespaces" else (None, None)
        info = ["--info-fd", str(info_w), "--"] if info_w is not None else []
        command = [*join, *self.prefix, *info, self.python, "-I", "-S", "-B", "-c", RUNNER, *map(str, tasks),
                   str(verdict_w)]  # fmt: skip
        try:
            proc = subprocess.Popen(
                command,
                stdin=stdin,
                stdout=out_w,
                stderr=err_w,
                pass_fds=[fd for fd in (*tasks, verdict_w, info_w) if fd is not None],
                cwd=work,
                env=_environment(work) if work else {},
                start_new_session=True,
                **self._switch_user(),
            )
        finally:
            if info_w is not None:
                os.close(info_w)
            _close(fds, out_w)
            _close(fds, err_w)
        deadline = time.monotonic() + self.limits.wall_seconds
        init = _sandbox_init(info_r, proc.pid) if info_r is not None else None
        try:
            limit = self.limits.file_bytes
            texts = _collect([out_r, err_r], fds, deadline, limit, [limit, STDERR_KEPT])
            try:
                returncode = proc.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                _kill(proc, init)
                returncode = None
            return returncode, *texts
        finally:
            if proc.poll() is None:
                _kill(proc, init)
            if init is not None:
                os.close(init)

    def _switch_user(self) -> dict:
        """Popen's own switch of user, where no setpriv in the prefix does it: Python then forks the whole trainer
        (no vfork once the user changes), which costs a trainer with gigabytes of memory a tenth of a second."""
        if not self.identity or any(os.path.basename(p) == "setpriv" for p in self.prefix[:1]):
            return {}
        return {"user": self.identity[0], "group": self.identity[1], "extra_groups": []}

    @classmethod
    def unavailable(cls, problem: str, limits: Limits) -> "Sandbox":
        return cls("namespaces", sys.executable, (), limits, problem)


def _close(fds: list[int], fd: int) -> None:
    """Close ``fd`` once: a number closed twice may by then be another thread's."""
    fds.remove(fd)
    os.close(fd)


def _sealed(data: bytes, name: str) -> int:
    """A memory file holding ``data`` that no one can write, grow or shrink any more: the sandbox's stdin."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _collect(pipes: list[int], fds: list[int], deadline: float, limit: int, keep: list[int]) -> list[bytes]:
    """Read each pipe until its end, the deadline or ``limit`` bytes: past the limit the pipe is closed (the
    program's next write fails); of what came, the first ``keep`` bytes (one number per pipe) are kept."""
    chunks = {fd: bytearray() for fd in pipes}
    read = dict.fromkeys(pipes, 0)
    kept_bytes = dict(zip(pipes, keep))
    with selectors.DefaultSelector() as selector:
        for fd in pipes:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                data = os.read(key.fd, 1 << 16)
                kept = chunks[key.fd]
                kept += data[: min(limit, kept_bytes[key.fd]) - len(kept)]
                read[key.fd] += len(data)
                if not data or read[key.fd] >= limit:
                    selector.unregister(key.fd)
                    if data:
                        _close(fds, key.fd)
    return [bytes(chunks[fd]) for fd in pipes]


def _read_upto(fd: int, limit: int) -> bytes:
    """What a pipe whose writers are gone holds, up to ``limit`` bytes and one more (so that more reads as more)."""
    data = b""
    while len(data) <= limit and (chunk := os.read(fd, limit + 1 - len(data))):
        data += chunk
    return data


def _sandbox_init(info_r: int, bwrap_pid: int) -> int | None:
    """A pidfd of the sandbox's first process (PID 1 of its namespace), from bwrap's --info-fd; None if it never
    started. Killing it kills the namespace, and bwrap returns once every process in it is gone."""
    with os.fdopen(info_r, "rb") as f:
        text = f.read()
    try:
        pid = json.loads(text)["child-pid"]
        pidfd = os.pidfd_open(pid)
    except (ValueError, KeyError, OSError):
        return None
    try:  # the pid is still bwrap's child, not a process that reused the number
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        parent = None
    if parent != bwrap_pid:
        os.close(pidfd)
        return None
    return pidfd


def _kill(proc: subprocess.Popen, init: int | None) -> None:
    """Kill the sandbox and wait until nothing it started is left."""
    if init is not None:
        try:
            signal.pidfd_send_signal(init, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def workers() -> int:
    """Sandboxes at a time: one per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# The probe: the interpreter runs, and the process limit holds (forks past it fail), before any model code runs
PROBE = """
import os, signal
children = []
for _ in range({tries}):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        signal.pause()
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
print(6 * 7, len(children))
"""


def resolve(mode: str = "namespaces", limits: Limits | None = None) -> Sandbox:
    """The sandbox this machine gives: bubblewrap's namespaces, or, when asked for, resource limits only; tried
    once with a probe. Without a working one, ``problem`` names what is missing."""
    limits = limits or Limits()
    if mode not in MODES:
        raise GrpoError(f"sandbox {mode!r} is not a sandbox mode: use {' or '.join(MODES)}")
    fallback = "or set sandbox: rlimits in the recipe to run model code with resource limits only"
    identity = _nobody()
    found = _interpreter(others=identity is not None)
    if found is None:
        return Sandbox.unavailable(
            f"the sandbox runs as nobody under root, and nobody cannot reach this Python ({sys.base_prefix}): "
            "install the system's python3, or train as a normal user",
            limits,
        )
    python, roots = found
    setpriv = shutil.which("setpriv") if identity else None
    drop = (setpriv, f"--reuid={identity[0]}", f"--regid={identity[1]}", "--clear-groups", "--") if setpriv else ()
    if mode == "namespaces" and (bwrap := shutil.which("bwrap")) is None:
        return Sandbox.unavailable(f"bubblewrap (bwrap) is not installed: {INSTALL}, {fallback}", limits)
    budget, limits = Budget.make(limits, workers(), cgroup=not identity or bool(drop))  # joined before the switch
    if mode == "rlimits":
        sandbox = Sandbox("rlimits", python, drop, limits, workers=workers(), identity=identity, budget=budget)
    else:
        prefix = (*drop, bwrap, *bwrap_command(python, roots, limits)[1:])
        sandbox = Sandbox("namespaces", python, prefix, limits, workers=workers(), identity=identity, budget=budget)
    try:
        probe = sandbox.run(Program(PROBE.format(tries=limits.processes + 8)))
    except (OSError, SandboxError) as exc:
        said = str(exc)
        why = _missing_namespaces() if "namespace" in said or "uid map" in said else "it fails"
        return Sandbox.unavailable(f"bwrap cannot make the sandbox here: {why} ({said}); {fallback}", limits)
    answer, _, forked = probe.stdout.strip().partition(" ")
    if answer != "42":
        return Sandbox.unavailable(
            f"the sandbox's Python does not run ({probe.stderr.strip()[-160:]}); {fallback}", limits
        )
    if int(forked) >= limits.processes:
        return Sandbox.unavailable(
            f"the process limit does not hold in the sandbox ({forked} processes started, limit "
            f"{limits.processes}): a fork bomb would fill the machine",
            limits,
        )
    return sandbox


_current: Sandbox | None = None


def use(mode: str = "namespaces", limits: Limits | None = None) -> Sandbox:
    """Decide the sandbox for this process once (the command that knows the recipe calls this); under rlimits the
    choice is printed, as it is weaker."""
    global _current
    _current = resolve(mode, limits)
    if _current.mode == "rlimits":
        print(f"Sandbox: {_current.line()}")
    return _current


def current() -> Sandbox:
    """The sandbox decided for this process, or the default (namespaces) decided now."""
    return _current or use()
