"""Run model-written Python in a sandbox that nothing escapes: bubblewrap namespaces plus resource limits.

Each program runs in a child of ``bwrap`` (https://github.com/containers/bubblewrap, the sandbox of Flatpak), as
this user, or as ``nobody`` when the trainer runs as root (the kernel exempts root's uid from the process limit,
even in a user namespace without capabilities), with:

- namespaces of its own: user (no capabilities, uid 65534 inside, no further user namespaces), PID (nothing it
  starts outlives the call: when its first process ends the kernel kills the rest), network (a loopback that is
  down: no connection anywhere, not even to 127.0.0.1 or an abstract socket of the host), mount, IPC, UTS, cgroup;
- a new session, so it cannot signal the trainer's process group nor push keys into its terminal;
- a file system of its own: ``/usr`` (and ``/bin``, ``/lib``...), the Python installation it runs on (the
  trainer's own, or the system's where nobody cannot reach that one), ``/etc/ld.so.cache``, a fresh ``/proc`` and
  a minimal ``/dev``, all read-only, and two small private tmpfs folders, ``/tmp`` (its working folder and
  ``HOME``) and ``/dev/shm``, the only places it can write. The home folders, ``/root``, the rest of ``/etc``, the
  project, the data, ``/var``, ``/run``, ``/sys`` and the GPUs are not there at all;
- an empty environment (PATH, HOME, TMPDIR and LANG only: no tokens, no ``HF_*`` or ``WANDB_*``);
- limits, set inside the sandbox before the program runs: wall time (the whole namespace is killed), CPU time,
  address space per process, processes and threads, file size (which also caps each captured stream: stdout and
  stderr are files), open files, no core dumps.

What it does not isolate: the kernel itself (a kernel exploit escapes any namespace), CPU side channels and the
sharing of CPU time, caches and memory bandwidth, world-readable facts in ``/proc`` (``cpuinfo``, ``meminfo``,
the load, the kernel's version and command line), the read-only files of ``/usr`` and of the Python installation
(its site-packages included), and memory summed over processes: the limit is per process, so
``processes x memory_bytes`` at worst (no cgroup is used).

A harness inside the sandbox (``RUNNER``) runs the program and, for HumanEval-style tests, prints a random nonce
only after ``check(<entry_point>)`` has returned; the nonce is never in the program's source, arguments,
environment, input or files. An early ``sys.exit(0)``, ``os._exit(0)`` or an exit handler therefore never passes.
A program that reads the harness's own memory (frames, ``gc``, ctypes) could still find it: the harness stops
exits that skip the tests, not attacks on itself.

Where bwrap is missing or the kernel allows no user namespaces, ``resolve()`` gives a ``problem`` naming what is
missing, and running model code refuses with it, unless ``mode="rlimits"`` is asked for: then the program runs
with the resource limits, an empty environment and a private working folder only, and says so. ``resolve()``
tries the sandbox once before any model code runs, and refuses it too if the process limit does not hold there.
"""

import concurrent.futures
import dataclasses
import json
import marshal
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from grpo_cli.errors import GrpoError

MODES = ("namespaces", "rlimits")
INSTALL = "apt-get install bubblewrap (dnf/pacman/apk: bubblewrap)"
SANDBOX_UID = 65534  # nobody, inside the sandbox's user namespace


class SandboxError(GrpoError):
    """The sandbox itself failed or is missing: never the program's fault, so never a score."""


@dataclasses.dataclass(frozen=True)
class Limits:
    wall_seconds: float = 5.0
    cpu_seconds: int = 5
    memory_bytes: int = 1 << 30  # address space, per process
    processes: int = 32  # threads included
    file_bytes: int = 4 << 20  # any file written, stdout and stderr included
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
    the harness runs ``setup``, the code, the test, then ``check(entry_point)``; with ``asserts`` (MBPP) it runs
    ``setup``, the code, then each assert alone and counts those that pass."""

    code: str
    stdin: str = ""
    setup: str = ""
    test: str | None = None
    entry_point: str | None = None
    asserts: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Result:
    returncode: int | None  # None: killed at the wall-time limit
    stdout: str  # the harness's own line removed
    stderr: str
    seconds: float
    passed: bool = False  # tests: check() returned; asserts: every one passed
    asserts_passed: int = 0

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


# The harness, run by the sandbox's Python: it reads the task from an inherited file descriptor (closed before any
# model code runs), sets the limits, runs the program, and reports with the nonce only when the tests completed.
RUNNER = r"""
import builtins, marshal, os, resource, sys
def main(task_fd, ready_fd):
    with os.fdopen(task_fd, "rb") as f:
        task = marshal.loads(f.read())
    for name, value in task.pop("limits").items():
        resource.setrlimit(getattr(resource, name), (value, value))
    builtins.exit = builtins.quit = sys.exit  # what site would give, without its start-up time
    sys.argv = ["solution.py"]
    ns = {"__name__": "__main__" if task["script"] else "solution", "__builtins__": builtins}
    nonce = task.pop("nonce").encode()
    os.write(ready_fd, b"R")  # from here on, a failure is the program's
    os.close(ready_fd)
    exec(compile(task["setup"], "setup.py", "exec"), ns)
    exec(compile(task["code"], "solution.py", "exec"), ns)
    if task["script"]:
        return
    passed = 0
    if task["test"] is not None:
        exec(compile(task["test"], "test.py", "exec"), ns)
        ns["check"](ns[task["entry_point"]])
    for line in task["asserts"]:
        try:
            exec(compile(line, "test.py", "exec"), ns)
            passed += 1
        except Exception:
            pass
    try:
        sys.stdout.flush()
    except Exception:
        pass
    os.write(1, b"\n" + nonce + b" " + str(passed).encode() + b"\n")
    os._exit(0)
main(int(sys.argv[1]), int(sys.argv[2]))
"""


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
    cmd = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID),
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

    def line(self) -> str:
        if self.problem:
            return f"none: {self.problem}"
        if self.mode == "rlimits":
            who = "nobody" if self.identity else "this user"
            return (
                f"rlimits only, as asked: model code runs as {who} with resource limits, an empty environment "
                f"and a private working folder, and sees the file system, the network and {who}'s processes"
            )
        return (
            f"bubblewrap namespaces (user, pid, net, mount, ipc){' as nobody' if self.identity else ''}, "
            "read-only system, private /tmp; "
            f"{self.limits.wall_seconds:g}s, {self.limits.memory_bytes >> 20} MiB, {self.limits.processes} processes; "
            f"{self.workers} at a time"
        )

    def run(self, program: Program) -> Result:
        """Run one program in a fresh sandbox; everything it started is gone when this returns. Raises
        SandboxError when the sandbox itself failed (the harness never reached the program)."""
        if self.problem:
            raise SandboxError(f"model code cannot run: {self.problem}")
        nonce = secrets.token_hex(16)
        task = {
            "limits": self.limits.rlimits(),
            "nonce": nonce,
            "script": program.test is None and not program.asserts,
            "code": program.code,
            "setup": program.setup,
            "test": program.test,
            "entry_point": program.entry_point,
            "asserts": list(program.asserts),
        }
        work = tempfile.mkdtemp(prefix="grpo-sandbox-") if self.mode == "rlimits" else None
        if work and self.identity:
            os.chown(work, *self.identity)
        task_fd = os.memfd_create("grpo-task")
        ready_r, ready_w = os.pipe()
        try:
            with (
                tempfile.TemporaryFile() as stdin,
                tempfile.TemporaryFile() as stdout,
                tempfile.TemporaryFile() as stderr,
            ):
                stdin.write(program.stdin.encode())
                stdin.seek(0)
                os.write(task_fd, marshal.dumps(task, 4))  # marshal: no import to pay for in the sandbox
                os.lseek(task_fd, 0, os.SEEK_SET)
                started = time.monotonic()
                returncode = self._spawn(task_fd, ready_w, stdin, stdout, stderr, work)
                seconds = time.monotonic() - started
                out, err = (_read(f, self.limits.file_bytes) for f in (stdout, stderr))
            os.close(ready_w)
            ready_w = None
            reached = os.read(ready_r, 1) == b"R"  # every writer is gone: the byte, or end of file
        finally:
            for fd in (task_fd, ready_r, ready_w):
                if fd is not None:
                    os.close(fd)
            if work:
                shutil.rmtree(work, ignore_errors=True)
        if not reached:
            said = next((line for line in err.splitlines() if line.strip()), "no output")
            what = f"did not start within {self.limits.wall_seconds:g}s" if returncode is None else "failed"
            raise SandboxError(f"the sandbox {what} before running the program ({said[:200]})")
        head, sep, tail = out.rpartition(f"\n{nonce} ")
        if returncode == 0 and sep and tail.endswith("\n") and tail[:-1].isdigit():
            passed = int(tail[:-1])
            return Result(returncode, head, err, seconds, passed == len(program.asserts), passed)
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

    def _spawn(self, task_fd: int, ready_w: int, stdin, stdout, stderr, work: str | None) -> int | None:
        """Start the sandbox, wait up to the wall-time limit, kill it past that; the exit status, None if killed."""
        info_r, info_w = os.pipe() if self.mode == "namespaces" else (None, None)
        info = ["--info-fd", str(info_w), "--"] if info_w is not None else []
        command = [*self.prefix, *info, self.python, "-I", "-S", "-B", "-c", RUNNER, str(task_fd), str(ready_w)]
        try:
            proc = subprocess.Popen(
                command,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                pass_fds=[fd for fd in (task_fd, ready_w, info_w) if fd is not None],
                cwd=work,
                env=_environment(work) if work else {},
                start_new_session=True,
                **self._switch_user(),
            )
        finally:
            if info_w is not None:
                os.close(info_w)
        init = _sandbox_init(info_r, proc.pid) if info_r is not None else None
        try:
            return proc.wait(timeout=self.limits.wall_seconds)
        except subprocess.TimeoutExpired:
            _kill(proc, init)
            return None
        finally:
            if init is not None:
                os.close(init)

    def _switch_user(self) -> dict:
        """Popen's own switch of user, where no setpriv in the prefix does it: Python then forks the whole trainer
        (no vfork once the user changes), which costs a trainer with gigabytes of memory a tenth of a second."""
        if not self.identity or (self.prefix and os.path.basename(self.prefix[0]) == "setpriv"):
            return {}
        return {"user": self.identity[0], "group": self.identity[1], "extra_groups": []}

    @classmethod
    def unavailable(cls, problem: str, limits: Limits) -> "Sandbox":
        return cls("namespaces", sys.executable, (), limits, problem)


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


def _read(f, limit: int) -> str:
    f.seek(0)
    return f.read(limit).decode("utf-8", errors="replace")


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
    if mode == "rlimits":
        sandbox = Sandbox("rlimits", python, drop, limits, workers=workers(), identity=identity)
    elif (bwrap := shutil.which("bwrap")) is None:
        return Sandbox.unavailable(f"bubblewrap (bwrap) is not installed: {INSTALL}, {fallback}", limits)
    else:
        prefix = (*drop, bwrap, *bwrap_command(python, roots, limits)[1:])
        sandbox = Sandbox("namespaces", python, prefix, limits, workers=workers(), identity=identity)
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
