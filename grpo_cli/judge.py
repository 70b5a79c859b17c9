"""The judge: the program each sandbox runs first (``python -I -S -B -c <this file's text> BOX_FD TASK_FD VERDICT_FD``).

It reads the box (limits, filter: marshal) from an inherited descriptor, joins a fresh session keyring, becomes
undumpable, installs the seccomp filter, sets the limits and says ``R`` on the verdict pipe. A script then reads the
task from a second descriptor and runs as ``__main__`` in this process. Tests are judged here: the candidate is
forked first, before this process reads the task, and closes the verdict pipe and the task's descriptor, so its
memory never holds the tests; the row's setup and tests then run in this process's namespace, with its builtins,
compiled before the candidate is sent the setup and the model's code, which it runs in its own namespace before it
answers calls on a pair of pipes. The entry
point and the names the asserts call are stubs that send the arguments (marshal) and take back plain data only,
checked here; any other name a test uses is the setup's or the judge's, never the candidate's. The last word
on the verdict pipe is ``P<count>\n``. Only the standard library's cheapest modules load before the task: each
sandbox pays for this file's start-up. See grpo_cli/sandbox.py for the sandbox around it.
"""

import _signal
import builtins
import marshal
import os
import resource
import sys

PLAIN = {type(None), bool, int, float, complex, str, bytes}
SEQUENCES = {tuple, list, set, frozenset}
ITERATION = {"StopIteration", "StopAsyncIteration"}  # would end a test's loop over the candidate's results early


def harden(task):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if task["keyctl"] >= 0 and libc.syscall(task["keyctl"], 1, None) < 0 and ctypes.get_errno() not in (1, 38):
        raise OSError(ctypes.get_errno(), "cannot join a fresh session keyring")
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE 0
        raise OSError(ctypes.get_errno(), "cannot make the judge undumpable")
    program = task["seccomp"]
    if program:

        class Fprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        buffer = ctypes.create_string_buffer(program, len(program))
        fprog = Fprog(len(program) // 8, ctypes.addressof(buffer))
        if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "cannot install the seccomp filter")


def send(fd, data):
    data = memoryview(len(data).to_bytes(4, "little") + data)
    while data:
        data = data[os.write(fd, data) :]


def receive(fd, limit):
    head = read_exactly(fd, 4)
    if head is None:
        return None
    size = int.from_bytes(head, "little")
    if size > limit:
        raise ValueError("an answer past the size limit")
    return read_exactly(fd, size)


def read_exactly(fd, size):
    data = bytearray()
    while len(data) < size:
        chunk = os.read(fd, min(size - len(data), 1 << 20))
        if not chunk:
            if data:
                raise EOFError("the candidate's answer was cut")
            return None
        data += chunk
    return bytes(data)


def plain(value):
    # Only containers of ``value`` itself are pushed, which ``value`` keeps alive: no id in ``seen`` is reused.
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind in PLAIN:
            continue
        if kind not in SEQUENCES and kind is not dict:
            return False
        if id(item) in seen:
            continue
        seen.add(id(item))
        if kind is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
        else:
            stack.extend(item)
    return True


class Handle:
    # The judge's stand-in for a candidate object that is not plain data: it can only be passed back.
    __slots__ = ("number",)

    def __init__(self, number):
        self.number = number

    def __bool__(self):
        raise TypeError("a candidate's object has no truth value in the tests")

    def __repr__(self):
        return "<candidate object>"


def serve(box, calls, replies):
    first = receive(calls, 1 << 30)  # the setup and the model's code: the only part of the task it ever holds
    if first is None:
        os._exit(0)
    setup, code = marshal.loads(first)
    ns = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(compile(setup, "setup.py", "exec"), ns)
        exec(compile(code, "solution.py", "exec"), ns)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        os._exit(1)
    objects, tag = [], box["tag"]

    def unwrap(value):
        if type(value) is tuple and len(value) == 2 and value[0] == tag:
            return objects[value[1]]
        if type(value) in (list, tuple):
            return type(value)(unwrap(v) for v in value)
        if type(value) is dict:
            return {k: unwrap(v) for k, v in value.items()}
        return value

    while True:
        request = receive(calls, 1 << 30)
        if request is None:
            os._exit(0)
        target, args, kwargs, handles = marshal.loads(request)
        if handles:
            args, kwargs = unwrap(args), unwrap(kwargs)
        try:
            value = (ns[target] if type(target) is str else objects[target])(*args, **kwargs)
            try:
                reply = marshal.dumps(("value", value))
            except ValueError:
                objects.append(value)
                reply = marshal.dumps(("object", len(objects) - 1))
        except BaseException as exc:
            reply = marshal.dumps(("raise", type(exc).__name__))
        send(replies, reply)


class Candidate:
    # Forked before the judge reads the tests: the candidate's memory never holds them, nor the verdict pipe.
    def __init__(self, box, closed):
        calls_r, self.calls = os.pipe()
        self.replies, replies_w = os.pipe()
        self.tag, self.limit = box["tag"], box["answer_bytes"]
        self.pid = os.fork()
        if self.pid == 0:
            try:
                for fd in (*closed, self.calls, self.replies):
                    os.close(fd)
                serve(box, calls_r, replies_w)
            finally:
                os._exit(1)
        os.close(calls_r)
        os.close(replies_w)

    def start(self, setup, code):
        send(self.calls, marshal.dumps((setup, code)))

    def wrap(self, value):
        if type(value) is Handle:
            return (self.tag, value.number)
        if type(value) in (list, tuple):
            return type(value)(self.wrap(v) for v in value)
        if type(value) is dict:
            return {k: self.wrap(v) for k, v in value.items()}
        return value

    def call(self, target, args, kwargs):
        try:
            request = marshal.dumps((target, args, kwargs, False))
        except ValueError:  # a handle among the arguments, or what cannot cross
            try:
                request = marshal.dumps((target, self.wrap(args), self.wrap(kwargs), True))
            except ValueError:
                raise TypeError("only plain data can be passed to the candidate") from None
        send(self.calls, request)
        data = receive(self.replies, self.limit)
        if data is None:
            raise RuntimeError("the candidate's process ended")
        reply = marshal.loads(data)
        if not plain(reply) or type(reply) is not tuple or len(reply) != 2 or type(reply[0]) is not str:
            raise TypeError("the candidate answered with something that is not plain data")
        kind, value = reply
        if kind == "value":
            return value
        if kind == "object" and type(value) is int:
            return Handle(value)
        if kind == "raise" and type(value) is str:
            exception = vars(builtins).get(value)
            if type(exception) is type and issubclass(exception, Exception) and value not in ITERATION:
                raise exception("raised by the candidate")
            raise RuntimeError("the candidate raised " + value[:100])
        raise TypeError("the candidate answered with something that is not plain data")

    def stub(self, target):
        def remote(*args, **kwargs):
            return self.call(target, args, kwargs)

        remote.__name__ = target
        return remote


def judge(box, task_fd, verdict):
    os.write(verdict, b"R")  # from here on, a failure is the program's
    ns = {"__name__": "judge", "__builtins__": builtins}
    passed, candidate = 0, None
    try:
        candidate = Candidate(box, (verdict, task_fd))
        with os.fdopen(task_fd, "rb") as f:
            task = marshal.loads(f.read())
        test = compile(task["test"], "test.py", "exec") if task["test"] is not None else None
        asserts = []
        for line in task["asserts"]:
            try:
                asserts.append(compile(line, "test.py", "exec"))
            except SyntaxError:
                asserts.append(None)
        exec(compile(task["setup"], "setup.py", "exec"), ns)
        if test is not None:
            exec(test, ns)
        for module in task["imports"]:  # the tests' own imports, before any model code runs
            try:
                __import__(module)
            except ImportError:
                pass
        candidate.start(task["setup"], task["code"])
        for name in task["modules"]:
            if name not in ns:
                ns[name] = __import__(name)
        for name in task["remote"]:
            if name not in ns:
                ns[name] = candidate.stub(name)
        if task["entry_point"]:  # the one name of a HumanEval test that is the candidate's (its helpers are not)
            ns[task["entry_point"]] = candidate.stub(task["entry_point"])
        if test is not None:
            try:
                ns["check"](ns[task["entry_point"]])
                passed = 1
            except BaseException:
                pass
        for code in asserts:
            try:
                if code is not None:
                    exec(code, ns)
                    passed += 1
            except BaseException:
                pass
    except BaseException as exc:  # the setup, or the candidate could not start: said, and nothing passed
        os.write(2, ("judge: " + type(exc).__name__ + ": " + str(exc)[:200] + "\n").encode())
    finally:
        os.write(verdict, b"P%d\n" % passed)
        if candidate is not None:  # killed and reaped here: an orphan may go to an init that never reaps
            os.kill(candidate.pid, 9)
            os.waitpid(candidate.pid, 0)
        os._exit(0)


def main(box_fd, task_fd, verdict):
    # PID 1 of a namespace gets the signals it handles from inside, and Python handles SIGINT: a candidate could
    # raise KeyboardInterrupt in the judge at a time of its choosing. _signal: signal.py would import enum.
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    with os.fdopen(box_fd, "rb") as f:
        box = marshal.loads(f.read())
    harden(box)
    for name, value in box["limits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    builtins.exit = builtins.quit = sys.exit  # what site would give, without its start-up time
    sys.argv = ["solution.py"]
    if not box["script"]:
        for module in box["preload"]:  # the prompt's imports, once for both processes
            try:
                __import__(module)
            except ImportError:
                pass
        judge(box, task_fd, verdict)
    os.write(verdict, b"R")
    os.close(verdict)
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)  # a program of its own: Python's usual SIGINT
    with os.fdopen(task_fd, "rb") as f:
        task = marshal.loads(f.read())
    ns = {"__name__": "__main__", "__builtins__": builtins}
    exec(compile(task["setup"], "setup.py", "exec"), ns)
    exec(compile(task["code"], "solution.py", "exec"), ns)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
