"""Hostile completions against the sandbox: each scores 0, nothing escapes, this process survives, nothing is left
running. They run through the code_tests reward, as training would, on a HumanEval-style row."""

import dataclasses
import os
import secrets
import shutil
import socket
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
