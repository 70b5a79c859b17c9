"""Hostile completions against the sandbox: each scores 0, nothing escapes, this process survives, nothing is left
running. They run through the code_tests reward, as training would, on a HumanEval-style row."""

import ctypes
import dataclasses
import errno
import os
import platform
import secrets
import shutil
import socket
import struct
import sys
import time
from pathlib import Path

import psutil
import pytest

from grpo_cli import sandbox
from grpo_cli.errors import GrpoError
from grpo_cli.sandbox import Limits, Program, SandboxError
from rewards import REWARDS, checked
from rewards.code import code_tests_reward

PROJECT = Path(__file__).resolve().parents[1]
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
ADD = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"


def fenced(code: str) -> str:
    return f"Here it is:\n```python\n{code}```\n"


HONEST = fenced(ADD)
LIMITS = Limits(wall_seconds=3, cpu_seconds=3)  # short, so the cases that hang cost little
MARK = "GRPO_TEST_SANDBOX"  # set in the sandboxes of this module alone: other runs' sandboxes are not ours


@pytest.fixture(scope="module")
def box():
    resolved = sandbox.resolve(limits=LIMITS)
    if resolved.problem and not os.environ.get("GRPO_REQUIRE_SANDBOX"):
        pytest.skip(f"no sandbox here: {resolved.problem}")
    assert resolved.problem is None, resolved.problem
    token = secrets.token_hex(8)
    return dataclasses.replace(resolved, prefix=(*resolved.prefix, "--setenv", MARK, token)), token


def leftovers(token: str) -> list[psutil.Process]:
    """Processes of this module's sandboxes still there: bwrap (the token is in its arguments) or anything started
    inside (the token is in its environment)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if token in proc.cmdline() or proc.environ().get(MARK) == token:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


@pytest.fixture
def score(box, monkeypatch):
    """Score completions with code_tests on the HumanEval-style row; afterwards nothing may be left running."""
    box, token = box
    monkeypatch.setattr(sandbox, "_current", box)
    me = psutil.Process()

    def scored(*completions: str) -> list[float]:
        n = len(completions)
        values = code_tests_reward(None, list(completions), test=[TEST] * n, entry_point=["add"] * n)
        assert me.children(recursive=True) == []
        assert leftovers(token) == []
        return values

    return scored


def test_an_honest_completion_scores_1(score):
    assert score(HONEST, [{"role": "assistant", "content": HONEST}]) == [1.0, 1.0]


FORK_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
LOOP = "while True:\n    pass\n"
IGNORES_TERM = (
    "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):\n"
    "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass\n"
)


@pytest.mark.parametrize("code", [FORK_BOMB, LOOP, IGNORES_TERM], ids=["fork bomb", "loop", "ignores SIGTERM"])
def test_what_never_ends_is_killed_at_the_wall_time_limit(score, code):
    started = time.monotonic()
    assert score(fenced(code + ADD)) == [0.0]
    assert time.monotonic() - started < LIMITS.wall_seconds + 5


@pytest.mark.parametrize(
    "code",
    ["x = bytearray(8 * 2**30)", "x = [1] * 10**9", "x = 'a' * 10**10"],
    ids=["bytearray", "list", "string"],
)
def test_a_huge_allocation_fails(score, code):
    assert score(fenced(f"{code}\n{ADD}")) == [0.0]
    assert psutil.Process().memory_info().rss < 4 * 2**30


@pytest.mark.parametrize("stream", ["sys.stdout", "sys.stderr"])
def test_a_flood_of_output_is_cut_at_the_file_size_limit(box, score, stream):
    box, _ = box
    flood = f"import sys\nwhile True:\n    {stream}.write('x' * 65536)\n"
    assert score(flood + WRONG) == [0.0]
    result = box.run(Program(flood))
    assert result.returncode != 0
    assert len(result.stdout) + len(result.stderr) <= LIMITS.file_bytes + 4096


@pytest.fixture
def canaries(tmp_path):
    """A folder with a file in this test's tmp folder, in the project and in the home folder (where this user may
    write)."""
    tag = secrets.token_hex(4)
    places = [tmp_path, PROJECT, Path.home()]
    folders = [place / f".sandbox-canary-{tag}" for place in places if os.access(place, os.W_OK)]
    for folder in folders:
        folder.mkdir()
        (folder / "keep.txt").write_text("keep")
    yield folders
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def test_nothing_outside_the_sandbox_is_written_or_removed(score, canaries):
    for folder in canaries:
        write = f"open({str(folder / 'keep.txt')!r}, 'a').write('owned')\nopen({str(folder / 'owned.txt')!r}, 'w')\n"
        remove = f"import shutil\nshutil.rmtree({str(folder)!r})\n"
        assert score(fenced(write + ADD), fenced(remove + ADD)) == [0.0, 0.0]
    for path in ("/owned.txt", "/usr/owned.txt", "/etc/owned.txt", "/proc/owned.txt", "/dev/owned.txt"):
        assert score(fenced(f"open({path!r}, 'w').write('x')\n" + ADD)) == [0.0]
    for folder in canaries:
        assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
        assert (folder / "keep.txt").read_text() == "keep"


def test_the_home_the_project_and_the_trainers_files_are_not_there(box):
    box, _ = box
    listing = box.run(
        Program(
            f"import os\nfor p in {[str(Path.home()), str(PROJECT), '/etc', '/var', '/run', '/sys']!r}:\n    print(p, os.path.exists(p) and sorted(os.listdir(p)))"
        )
    )
    seen = dict(line.split(" ", 1) for line in listing.stdout.splitlines())
    assert seen[str(PROJECT)] == "False"
    assert seen["/etc"] in ("False", "['ld.so.cache']")
    assert seen["/var"] == seen["/run"] == seen["/sys"] == "False"
    assert seen[str(Path.home())] in ("False", "[]") or Path.home().as_posix() in str(sandbox._interpreter()[1])


def test_the_private_tmp_is_writable_and_gone_afterwards(box):
    box, _ = box
    first = box.run(Program("open('/tmp/left.txt', 'w').write('x')\nimport os\nprint(os.getcwd(), os.listdir('/tmp'))"))
    assert first.stdout.strip() == "/tmp ['left.txt']"
    assert box.run(Program("import os\nprint(os.listdir('/tmp'))")).stdout.strip() == "[]"


def test_no_connection_to_a_listener_on_this_machine(score):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        connect = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')\n"
        assert score(fenced(connect + ADD)) == [0.0]
        with pytest.raises(BlockingIOError):
            listener.accept()


@pytest.mark.parametrize(
    "code",
    [
        "import os\nos.kill(os.getppid(), 9)\n",
        f"import os\nos.kill({os.getpid()}, 9)\n",
        "import os\nos.killpg(0, 9)\n",
        f"import os\nos.killpg(os.getpgid({os.getpid()}), 9)\n",
        "import os, signal\nfor pid in range(1, 300):\n    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n",
    ],
    ids=["parent", "trainer", "own group", "trainer's group", "every pid"],
)
def test_killing_the_parent_or_the_group_reaches_nothing_outside(score, code):
    assert score(code + WRONG) == [0.0]  # this process is still here to say so


def test_a_daemon_in_a_new_session_does_not_outlive_the_call(score):
    marker = f"{secrets.randbelow(10**6) + 10**6}.5"  # a sleep no other process has
    daemon = (
        "import os, time\npid = os.fork()\nif pid == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        f"        os.execv('/usr/bin/sleep', ['sleep', {marker!r}])\n    os._exit(0)\nos.waitpid(pid, 0)\n"
        "time.sleep(0.3)\n"
    )
    assert score(daemon + WRONG, daemon + LOOP) == [0.0, 0.0]
    assert [p for p in psutil.process_iter(["cmdline"]) if marker in (p.info["cmdline"] or [])] == []


def test_tokens_in_the_environment_are_not_seen(box, score, monkeypatch):
    box, _ = box
    secret = f"hf_{secrets.token_hex(8)}"
    for name in ("HF_TOKEN", "WANDB_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.setenv(name, secret)
    read = "import os\nassert os.environ['HF_TOKEN']\n"
    assert score(fenced(read + ADD)) == [0.0]
    dump = box.run(
        Program(
            "import os, glob\nprint(dict(os.environ))\nfor p in glob.glob('/proc/*/environ'):\n"
            "    try:\n        print(open(p, 'rb').read())\n    except OSError:\n        pass\n"
        )
    )
    assert dump.returncode == 0
    assert "HOME" in dump.stdout and secret not in dump.stdout and "HF_" not in dump.stdout


@pytest.mark.parametrize(
    "code",
    [
        WRONG + "import sys\nsys.exit(0)\n",
        WRONG + "import os\nos._exit(0)\n",
        WRONG + "import atexit, os\natexit.register(lambda: os._exit(0))\n",
        "def add(a, b):\n    raise SystemExit(0)\n",
        "def add(a, b):\n    import os\n    os._exit(0)\n",
        WRONG + "import sys\nsys.excepthook = lambda *args: None\n",
        WRONG + "print('\\nPASSED 0')\n",
    ],
    ids=["sys.exit", "os._exit", "atexit", "exit inside check", "os._exit inside check", "excepthook", "fake line"],
)
def test_an_early_exit_or_an_exit_handler_never_passes(score, code):
    assert score(code) == [0.0]


def test_the_battery_scores_0_in_one_parallel_batch(score):
    hostile = [FORK_BOMB + ADD, LOOP + ADD, "x = bytearray(8 * 2**30)\n" + ADD, WRONG + "import sys\nsys.exit(0)\n"]
    assert score(HONEST, *map(fenced, hostile), HONEST) == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_mbpp_asserts_score_the_share_that_passes_and_an_early_exit_none(box, monkeypatch):
    box, _ = box
    monkeypatch.setattr(sandbox, "_current", box)
    asserts = ["assert add(2, 3) == 5", "assert add(0, 0) == 0", "assert add(1, 1) == 3"]
    completions = [HONEST, WRONG, fenced(ADD + "import os\nos._exit(0)\n")]
    assert code_tests_reward(None, completions, test_list=[asserts] * 3) == [pytest.approx(2 / 3), 1 / 3, 0.0]


def test_a_sandbox_that_cannot_start_is_an_error_not_a_score(box, monkeypatch):
    box, _ = box
    broken = dataclasses.replace(box, python="/nonexistent/python")
    monkeypatch.setattr(sandbox, "_current", broken)
    with pytest.raises(SandboxError, match="before running the program"):
        code_tests_reward(None, [HONEST], test=[TEST], entry_point=["add"])
    with pytest.raises(GrpoError, match="raised SandboxError: the sandbox failed before running the program"):
        checked(REWARDS["code_tests"])(["p"], [HONEST], test=[TEST], entry_point=["add"])


def test_without_bwrap_it_refuses_in_one_line_unless_rlimits_is_asked_for(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    missing = sandbox.resolve()
    assert missing.problem.startswith("bubblewrap (bwrap) is not installed: apt-get install bubblewrap")
    assert "sandbox: rlimits" in missing.problem and "\n" not in missing.problem
    monkeypatch.setattr(sandbox, "_current", missing)
    with pytest.raises(SandboxError, match="model code cannot run: bubblewrap"):
        code_tests_reward(None, [HONEST], test=[TEST], entry_point=["add"])
    weak = sandbox.resolve("rlimits", LIMITS)
    assert weak.problem is None and weak.line().startswith("rlimits only, as asked")
    monkeypatch.setattr(sandbox, "_current", weak)
    assert code_tests_reward(None, [HONEST, WRONG + "import sys\nsys.exit(0)\n"], test=[TEST] * 2,
                             entry_point=["add"] * 2) == [1.0, 0.0]  # fmt: skip
    assert weak.run(Program("import time\ntime.sleep(60)\n")).timed_out


def test_unknown_mode_is_refused():
    with pytest.raises(GrpoError, match="use namespaces or rlimits"):
        sandbox.resolve("docker")


# --- The doors: keyrings, system calls, disk, shared memory, summed memory, rlimits mode ------------------------------


def run_bpf(program: bytes, arch: int, nr: int) -> int:
    """The return value of the seccomp program for one system call: the four instructions it uses, interpreted."""
    insns = [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    data = struct.pack("=iI", nr, arch)
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:
            acc = struct.unpack("=I", data[k : k + 4])[0]
        elif code in (0x15, 0x35):
            taken = acc == k if code == 0x15 else acc >= k
            pc += jt if taken else jf
        elif code == 0x06:
            return k
        pc += 1


@pytest.mark.parametrize("machine", sorted(sandbox.DENIED))
def test_the_seccomp_program_denies_its_calls_and_kills_other_architectures(machine):
    program = sandbox.seccomp_filter(machine)
    arch, numbers = sandbox.DENIED[machine]
    allow, eperm, kill = 0x7FFF0000, 0x00050001, 0x80000000
    for nr in numbers.values():
        assert run_bpf(program, arch, nr) == eperm
    for nr in (0, 1, 3, 57, 59, 63, 231):  # read, write, close... on each table: none denied
        assert nr in numbers.values() or run_bpf(program, arch, nr) == allow
    assert run_bpf(program, 0x40000003, 250) == kill  # i386, whose numbers differ
    if machine == "x86_64":
        assert run_bpf(program, arch, sandbox.X32_SYSCALL_BIT | 250) == eperm
    assert sandbox.seccomp_filter("sparc") == b""


CALLS = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
for name, nr in {numbers!r}.items():
    ctypes.set_errno(0)
    result = libc.syscall(nr, 0, 0, 0, 0, 0)
    print(name, result, ctypes.get_errno())
print(open('/proc/self/status').read())
"""


AIO = {
    "x86_64": {"io_setup": 206, "io_destroy": 207, "io_getevents": 208, "io_submit": 209, "io_cancel": 210,
               "io_pgetevents": 333},
    "aarch64": {"io_setup": 0, "io_destroy": 1, "io_submit": 2, "io_cancel": 3, "io_getevents": 4,
                "io_pgetevents": 292},
}  # fmt: skip
AIO_SETUP = """
context = ctypes.c_ulong(0)
ctypes.set_errno(0)
print('aio', libc.syscall({nr}, 64, ctypes.byref(context)), ctypes.get_errno())
"""


def rlimits_box() -> sandbox.Sandbox:
    return sandbox.resolve("rlimits", LIMITS)


@pytest.mark.parametrize("mode", ["namespaces", "rlimits"])
def test_each_denied_call_fails_with_eperm_inside(box, mode):
    box = box[0] if mode == "namespaces" else rlimits_box()
    if not box.seccomp:
        pytest.skip("no seccomp filter for this architecture")
    numbers = sandbox.DENIED[platform.machine()][1]
    assert AIO[platform.machine()].items() <= numbers.items()  # Linux AIO: contexts count against fs.aio-max-nr
    result = box.run(Program(CALLS.format(numbers=numbers) + AIO_SETUP.format(nr=numbers["io_setup"])))
    assert result.returncode == 0, result.stderr
    said = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.split(" ")[0] in numbers)
    assert said == {name: f"-1 {errno.EPERM}" for name in numbers}
    assert f"aio -1 {errno.EPERM}\n" in result.stdout  # with valid arguments too
    assert "\nSeccomp:\t2\n" in result.stdout and "\nNoNewPrivs:\t1\n" in result.stdout


KEYCTL_JOIN, KEYCTL_READ, KEYCTL_SEARCH, SESSION = 1, 11, 10, -3


@pytest.mark.parametrize("mode", ["namespaces", "rlimits"])
def test_the_trainers_session_keyring_is_neither_read_nor_written(box, mode):
    box = box[0] if mode == "namespaces" else rlimits_box()
    numbers = sandbox.DENIED.get(platform.machine(), (0, {}))[1]
    if not numbers:
        pytest.skip("no system call numbers for this architecture")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(numbers["keyctl"], KEYCTL_JOIN, None) < 0:  # a session keyring of this process's own
        pytest.skip(f"keyrings are closed to this process (errno {ctypes.get_errno()})")
    secret = secrets.token_hex(16).encode()
    key = libc.syscall(numbers["add_key"], b"user", b"grpo-test-secret", secret, len(secret), SESSION)
    assert key > 0, ctypes.get_errno()
    steal = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nbuf = ctypes.create_string_buffer(256)\n"
        f"print('read', libc.syscall({numbers['keyctl']}, {KEYCTL_READ}, {key}, buf, 256), ctypes.get_errno())\n"
        f"print('plant', libc.syscall({numbers['add_key']}, b'user', b'grpo-test-planted', b'x', 1, {SESSION}),"
        " ctypes.get_errno())\n"
        "print(buf.raw.rstrip(b'\\0'))\ntry:\n    print(open('/proc/keys').read())\nexcept OSError as e:\n    print(e)\n"
    )
    result = box.run(Program(steal))
    assert result.returncode == 0, result.stderr
    assert "read -1 1\n" in result.stdout and "plant -1 1\n" in result.stdout
    assert secret.decode() not in result.stdout and "grpo-test-secret" not in result.stdout
    found = libc.syscall(numbers["keyctl"], KEYCTL_SEARCH, SESSION, b"user", b"grpo-test-planted", 0)
    assert found < 0  # nothing planted here


@pytest.mark.parametrize("mode", ["namespaces", "rlimits"])
def test_captured_output_is_a_pipe_that_fallocate_cannot_grow(box, mode):
    box = box[0] if mode == "namespaces" else rlimits_box()
    grow = (
        "import ctypes, os, stat\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "for fd in (0, 1, 2):\n    kind = 'pipe' if stat.S_ISFIFO(os.fstat(fd).st_mode) else 'other'\n"
        "    print(fd, kind, libc.fallocate(fd, 1, 0, 64 << 20), ctypes.get_errno(), flush=True)\n"
        "try:\n    os.write(0, b'x')\nexcept OSError as e:\n    print('stdin', e.errno)\n"
    )
    result = box.run(Program(grow, stdin="input"))
    lines = result.stdout.splitlines()
    assert (
        lines[0].startswith("0 other -1 ") and lines[1].startswith("1 pipe -1 ") and lines[2].startswith("2 pipe -1 ")
    )
    assert lines[3] in (f"stdin {errno.EPERM}", f"stdin {errno.EBADF}")  # sealed memory file, or read-only


@pytest.mark.parametrize("mode", ["namespaces", "rlimits"])
def test_sysv_shared_memory_and_queues_are_refused(box, mode):
    box = box[0] if mode == "namespaces" else rlimits_box()
    grab = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.shmget(0, 300 << 20, 0o1600), ctypes.get_errno())\n"
        "print(libc.msgget(0, 0o1600), ctypes.get_errno())\nprint(libc.semget(0, 1, 0o1600), ctypes.get_errno())\n"
    )
    result = box.run(Program(grab))
    assert result.stdout.split("\n")[:3] == [f"-1 {errno.EPERM}"] * 3


SUMMED = """
import os, select
r, w = os.pipe()
children = []
for _ in range(6):
    pid = os.fork()
    if pid == 0:
        data = b"x" * (300 << 20)
        os.write(w, b"1")
        select.select([], [], [])
    children.append(pid)
got, dead = 0, set()
while got + len(dead) < 6:  # each child either holds its 300 MiB or was killed
    if select.select([r], [], [], 0.05)[0]:
        got += len(os.read(r, 6))
    dead |= {pid for pid in children if pid not in dead and os.waitpid(pid, os.WNOHANG) != (0, 0)}
print(got, 6 - len(dead))
"""


def test_memory_summed_over_a_sandboxs_processes_is_bounded(box):
    box, _ = box
    if not (box.budget and box.budget.cgroup):
        assert box.workers * box.limits.processes * box.limits.memory_bytes <= box.budget.machine_bytes // 2
        pytest.skip("no cgroup here: the limits are scaled to the machine instead")
    patient = dataclasses.replace(box, limits=dataclasses.replace(box.limits, wall_seconds=30, cpu_seconds=30))
    result = patient.run(Program(SUMMED))
    allocated, alive = map(int, result.stdout.split())
    assert alive * (300 << 20) <= box.limits.memory_bytes < 6 * (300 << 20)  # at most 3 of the 6 hold theirs


def test_without_a_cgroup_the_limits_are_scaled_to_the_machine(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "CGROUP_ROOT", tmp_path)  # no memory or pids hierarchy there
    budget, limits = sandbox.Budget.make(Limits(), workers=4)
    assert budget.cgroup is None
    assert 4 * limits.processes * limits.memory_bytes <= budget.machine_bytes // 2
    assert limits.memory_bytes >= sandbox.MIN_PROCESS_BYTES or limits.processes == 4
    assert "no cgroup, limits scaled" in budget.line(limits)


def test_with_a_cgroup_each_sandbox_has_its_own_group_inside_the_runs(box):
    box, _ = box
    if not (box.budget and box.budget.cgroup):
        pytest.skip("no cgroup v1 memory and pids groups here (root on such a machine makes them)")
    result = box.run(Program("print(open('/proc/self/cgroup').read())"))
    assert result.returncode == 0
    run = sandbox.CGROUP_ROOT / "memory" / box.budget.cgroup
    assert int((run / "memory.limit_in_bytes").read_text()) == box.workers * box.limits.memory_bytes
    slots = [p for p in run.iterdir() if p.is_dir()]  # kept for the next sandbox, one per sandbox at a time
    assert 1 <= len(slots) <= box.workers
    assert all(
        (sandbox.CGROUP_ROOT / "pids" / box.budget.cgroup / p.name / "cgroup.procs").read_text() == "" for p in slots
    )
    assert all(int((p / "memory.limit_in_bytes").read_text()) == box.limits.memory_bytes for p in slots)
    assert "cgroup:" in box.line()


def test_a_daemon_of_rlimits_mode_is_killed_with_its_cgroup(monkeypatch):
    weak = rlimits_box()
    if not (weak.budget and weak.budget.cgroup):
        assert "whose daemons may outlive the call" in weak.line()
        pytest.skip("rlimits mode holds daemons only with a cgroup (root on a cgroup v1 machine)")
    marker = f"{secrets.randbelow(10**6) + 10**6}.5"
    daemon = (
        "import os, time\npid = os.fork()\nif pid == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        f"        os.execv('/usr/bin/sleep', ['sleep', {marker!r}])\n    os._exit(0)\nos.waitpid(pid, 0)\n"
        "time.sleep(0.3)\n"
    )
    monkeypatch.setattr(sandbox, "_current", weak)
    assert code_tests_reward(None, [daemon + WRONG], test=[TEST], entry_point=["add"]) == [0.0]
    weak.run(Program(daemon))
    time.sleep(0.1)
    assert [p for p in psutil.process_iter(["cmdline"]) if marker in (p.info["cmdline"] or [])] == []


@pytest.mark.parametrize(
    "data",
    [b"RP1\n", b"R", b"", b"RP\xc2\xb9\n", b"RP" + b"9" * 5000 + b"\n", b"RP1", b"RP1\nP1\n", b"RP-1\n", b"RP\xd9\xa1\n",
     b"XRP1\n", b"RP 1\n", b"RP+1\n", b"RP1_0\n"],
)  # fmt: skip
def test_the_verdict_is_parsed_strictly(data):
    reached, count = sandbox.parse_verdict(data)
    assert (reached, count) == {b"RP1\n": (True, 1), b"R": (True, None)}.get(data, (False, None))


def test_the_judge_takes_no_code_object_nested_in_dicts():
    """Tuples made on the way (a dict's items) are freed and their ids reused: the walk must not skip by them."""
    from grpo_cli import judge

    code = compile("1", "", "eval")
    for reply in [("value", {0: {1: code}}), ("value", {0: {1: {2: ...}}}), ("value", [{0: 1}, {(1, 2): {3: code}}])]:
        assert not judge.plain(reply)
    assert judge.plain(("value", {0: {1: (2, [3.0, b"4", {5}])}, "a": frozenset({None})}))


@pytest.mark.parametrize("mode", ["namespaces", "rlimits"])
def test_sigint_to_the_judge_changes_nothing(box, mode, monkeypatch):
    """The candidate's parent is the judge (PID 1 of the namespace): a KeyboardInterrupt there would fail or desync
    the tests."""
    box = box[0] if mode == "namespaces" else rlimits_box()
    monkeypatch.setattr(sandbox, "_current", box)
    code = "import os, signal, time\ndef add(a, b):\n    os.kill(os.getppid(), signal.SIGINT)\n    time.sleep(0.01)\n"
    code += "    return a + b\n"
    assert code_tests_reward(None, [fenced(code), fenced(code + "import os\nassert os.getppid() == 1\n")],
                             test=[TEST] * 2, entry_point=["add"] * 2) == [1.0, 1.0 if mode == "namespaces" else 0.0]  # fmt: skip


def test_a_result_holds_its_output_as_bytes_and_little_of_stderr(box):
    """4 MiB of invalid UTF-8 on each stream would decode to 16 MiB of text: a result keeps the bytes of stdout and
    the first STDERR_KEPT of stderr, and decodes them when read."""
    box, _ = box
    n = LIMITS.file_bytes
    result = box.run(
        Program(f"import sys\nsys.stdout.buffer.write(b'\\xff' * {n})\nsys.stderr.buffer.write(b'\\xff' * {n})\n")
    )
    assert result.returncode == 0, result.stderr[:200]
    held = sum(sys.getsizeof(getattr(result, f.name)) for f in dataclasses.fields(result))
    assert held < n + (64 << 10) + 4096
    assert result.stdout == "\ufffd" * n and result.stderr == "\ufffd" * (64 << 10) == "\ufffd" * sandbox.STDERR_KEPT
