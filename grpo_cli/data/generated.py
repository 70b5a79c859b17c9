"""Generated data sets, seeded and offline: arithmetic word problems and small function-writing tasks; each has a
``test`` split disjoint from ``train``."""

import random

GENERATED = "arithmetic"
BIG = "big-arithmetic"  # the same stories over 3- and 4-digit numbers: a calculator's work (the tools recipe)
HELD_OUT = 200  # the first problems of the seeded stream: the test split, never trained on

_NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]
_THINGS = ["apples", "books", "coins", "marbles", "pens", "shells", "stamps", "stickers"]


def _problem(rng: random.Random, big: bool = False) -> tuple[str, int]:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    kind = rng.choice("+-*")
    if kind == "+":
        low, high = (1000, 9999) if big else (2, 30)
        a, b = rng.randint(low, high), rng.randint(low, high)
        return f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b
    if kind == "-":
        a = rng.randint(2000, 9999) if big else rng.randint(10, 40)
        b = rng.randint(100, a - 1000) if big else rng.randint(1, a - 1)
        return f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?", a - b
    a, b = (rng.randint(12, 99), rng.randint(102, 999)) if big else (rng.randint(2, 9), rng.randint(2, 9))
    return f"{name} has {a} bags with {b} {thing} in each bag. How many {thing} are there in all?", a * b


def arithmetic_problems(split: str, count: int = 2000, seed: int = 0, big: bool = False) -> list[dict]:
    """Seeded one-step word problems with integer answers; ``test`` is disjoint from ``train``. ``big``: over
    3- and 4-digit numbers.

    >>> arithmetic_problems("test", 1)[0]["answer"].isdigit(), int(arithmetic_problems("test", big=True)[0]["answer"]) > 999
    (True, True)
    """
    rng, seen, rows = random.Random(seed), set(), []
    wanted = HELD_OUT if split == "test" else HELD_OUT + count
    while len(rows) < wanted:
        question, answer = _problem(rng, big)
        if question not in seen:
            seen.add(question)
            rows.append({"question": question, "answer": str(answer)})
    return rows[:HELD_OUT] if split == "test" else rows[HELD_OUT:]


FUNCTIONS = "functions"
FUNCTIONS_HELD_OUT = 100


def _ints(rng: random.Random, n: int = 3) -> list[int]:
    return [rng.randint(-20, 50) for _ in range(n)]


def _words(rng: random.Random) -> str:
    return "".join(rng.choice("abcdeilmnorst") for _ in range(rng.randint(3, 8)))


def _number(rng: random.Random) -> list:
    return [rng.randint(-50, 50)]


# (names, arguments, what it returns, body, arguments of a test case); {k} is a constant, {c} a letter
_FUNCTIONS = [
    (["add_{k}", "plus_{k}"], "x", "x plus {k}", "x + {k}", _number),
    (["times_{k}", "multiply_by_{k}"], "x", "x times {k}", "x * {k}", _number),
    (["minus_{k}", "subtract_{k}"], "x", "x minus {k}", "x - {k}", _number),
    (["remainder_{k}", "mod_{k}"], "x", "the remainder of x divided by {k}", "x % {k}", _number),
    (["divisible_by_{k}", "is_multiple_of_{k}"], "n", "True when n is divisible by {k} and False otherwise",
     "n % {k} == 0", _number),
    (["above_{k}", "greater_than_{k}"], "x", "True when x is greater than {k} and False otherwise", "x > {k}",
     _number),
    (["repeat_{k}", "copies_{k}"], "s", "the string s repeated {k} times", "s * {k}", lambda r: [_words(r)]),
    (["add_{k}_to_all", "shift_by_{k}"], "numbers", "the list numbers with {k} added to every number",
     "[x + {k} for x in numbers]", lambda r: [_ints(r)]),
    (["count_above_{k}"], "numbers", "how many numbers in the list numbers are greater than {k}",
     "sum(1 for x in numbers if x > {k})", lambda r: [_ints(r, 5)]),
    (["count_{c}"], "s", "how many times the letter '{c}' appears in the string s", "s.count('{c}')",
     lambda r: [_words(r)]),
    (["add", "plus", "sum_two"], "a, b", "the sum of a and b", "a + b", lambda r: _number(r) + _number(r)),
    (["largest", "biggest", "max_of"], "numbers", "the largest number in the list numbers", "max(numbers)",
     lambda r: [_ints(r)]),
    (["smallest", "min_of"], "numbers", "the smallest number in the list numbers", "min(numbers)",
     lambda r: [_ints(r)]),
    (["total", "sum_list"], "numbers", "the sum of the numbers in the list numbers", "sum(numbers)",
     lambda r: [_ints(r)]),
    (["reverse", "backwards"], "s", "the string s reversed", "s[::-1]", lambda r: [_words(r)]),
    (["is_even", "even"], "n", "True when n is even and False otherwise", "n % 2 == 0", _number),
    (["square", "squared"], "x", "x squared", "x * x", _number),
    (["last", "last_item"], "items", "the last item of the list items", "items[-1]", lambda r: [_ints(r)]),
    (["first", "first_item"], "items", "the first item of the list items", "items[0]", lambda r: [_ints(r)]),
    (["shout", "upper"], "s", "the string s in upper case", "s.upper()", lambda r: [_words(r)]),
    (["size", "count_items"], "items", "the number of items in the list items", "len(items)",
     lambda r: [_ints(r, r.randint(0, 6))]),
    (["join", "concat"], "a, b", "the string a followed by the string b", "a + b", lambda r: [_words(r), _words(r)]),
    (["distance", "gap"], "a, b", "the absolute difference between a and b", "abs(a - b)",
     lambda r: _number(r) + _number(r)),
]  # fmt: skip


def _function_task(rng: random.Random) -> dict:
    names, args, does, body, make = rng.choice(_FUNCTIONS)
    k, c = rng.randint(2, 20), rng.choice("abcdeilmnorst")
    name, does, body = (text.format(k=k, c=c) for text in (rng.choice(names), does, body))
    return _task(name, args, does, f"def {name}({args}):\n    return {body}\n", make, rng)


HARDER = "harder-functions"


def _odd_list(rng: random.Random) -> list:
    return [_ints(rng, rng.choice([3, 5, 7]))]


def _sentence(rng: random.Random) -> list:
    return [" ".join(_words(rng) for _ in range(rng.randint(2, 5)))]


# Less familiar one-step operations, chosen where the embedded model's greedy answer is often wrong but one of 8
# samples often right (a wrong operator, the function renamed): (names, argument names, what it returns, body,
# arguments of a test case, the range of {k}); {a} is the argument
_HARDER = [
    (["middle", "middle_item", "center"], ["items", "values", "xs"], "the middle item of the list {a}, which has an odd "
     "length", "{a}[len({a}) // 2]", _odd_list, None),
    (["sum_even", "even_total", "add_evens"], ["numbers", "nums", "values"], "the sum of the even numbers in the list {a}",
     "sum(x for x in {a} if x % 2 == 0)", lambda r: [_ints(r, r.randint(4, 7))], None),
    (["num_digits", "count_digits", "digit_count"], ["n", "number", "num"], "how many digits the non-negative integer {a} "
     "has", "len(str({a}))", lambda r: [r.randint(0, 99999)], None),
    (["count_even", "how_many_even", "evens"], ["numbers", "nums", "values"], "how many even numbers are in the list {a}",
     "sum(1 for x in {a} if x % 2 == 0)", lambda r: [_ints(r, r.randint(4, 7))], None),
    (["floor_div_{k}", "int_div_{k}"], ["x", "n", "value"], "{a} divided by {k}, rounded down to a whole number", "{a} // {k}",
     _number, (2, 9)),
    (["count_words", "word_count", "words"], ["s", "text", "sentence"], "how many words are in the string {a} (words are "
     "separated by spaces)", "len({a}.split())", _sentence, None),
    (["count_negative", "negatives", "how_many_negative"], ["numbers", "nums", "values"], "how many numbers in the list {a} "
     "are negative", "sum(1 for x in {a} if x < 0)", lambda r: [_ints(r, r.randint(4, 7))], None),
    (["last_{k}", "last_{k}_items", "tail_{k}"], ["items", "values", "xs"], "the last {k} items of the list {a}",
     "{a}[-{k}:]", lambda r: [_ints(r, r.randint(6, 8))], (2, 5)),
    (["positives", "keep_positive", "only_positive"], ["numbers", "nums", "values"], "the list of the numbers in {a} that "
     "are greater than 0", "[x for x in {a} if x > 0]", lambda r: [_ints(r, r.randint(4, 7))], None),
    (["count_vowels", "vowels", "vowel_count"], ["s", "word", "text"], "how many vowels (a, e, i, o, u) are in the string "
     "{a}", "sum(ch in 'aeiou' for ch in {a})", lambda r: [_words(r)], None),
    (["digit_sum", "sum_digits", "add_digits"], ["n", "number", "num"], "the sum of the digits of the non-negative integer "
     "{a}", "sum(int(d) for d in str({a}))", lambda r: [r.randint(0, 99999)], None),
    (["last_digit", "final_digit", "ones_digit"], ["n", "number", "num"], "the last digit of the non-negative integer {a}",
     "{a} % 10", lambda r: [r.randint(0, 99999)], None),
    (["sum_squares", "squares_total", "square_sum"], ["numbers", "nums", "values"], "the sum of the squares of the numbers in "
     "the list {a}", "sum(x * x for x in {a})", lambda r: [_ints(r, r.randint(3, 6))], None),
    (["sum_to", "triangle", "sum_up_to"], ["n", "m", "limit"], "the sum of the whole numbers from 1 to {a}",
     "{a} * ({a} + 1) // 2", lambda r: [r.randint(1, 200)], None),
]  # fmt: skip


def _harder_task(rng: random.Random) -> dict:
    names, args, does, body, make, bounds = rng.choice(_HARDER)
    k, arg = rng.randint(*(bounds or (2, 9))), rng.choice(args)
    name, does, body = (text.format(k=k, a=arg) for text in (rng.choice(names), does, body))
    return _task(name, arg, does, f"def {name}({arg}):\n    return {body}\n", make, rng)


def _task(name: str, args: str, does: str, source: str, make, rng: random.Random) -> dict:
    namespace = {}
    exec(source, namespace)  # our own reference solution, to compute the expected values
    cases = [make(rng) for _ in range(4)]
    checks = "".join(
        f"    assert candidate({', '.join(map(repr, case))}) == {namespace[name](*case)!r}\n" for case in cases
    )
    return {
        "question": f"Write a function {name}({args}) that returns {does}.",
        "answer": source,
        "test": f"def check(candidate):\n{checks}",
        "entry_point": name,
    }


TWO_STEP = "two-step-functions"

# Two steps on one value, each (name, what it does, body over v): the task asks for one after the other
_STEPS = {
    "x": [
        ("add_{k}", "add {k}", "v + {k}"), ("times_{k}", "multiply by {k}", "v * {k}"),
        ("minus_{k}", "subtract {k}", "v - {k}"), ("square", "square it", "v * v"), ("negate", "negate it", "-v"),
        ("halve", "integer-divide by 2", "v // 2"), ("mod_{k}", "take the remainder of division by {k}", "v % {k}"),
    ],
    "numbers": [
        ("sort", "sort it in increasing order", "sorted(v)"), ("reverse", "reverse it", "v[::-1]"),
        ("add_{k}", "add {k} to every number", "[n + {k} for n in v]"),
        ("keep_even", "keep only the even numbers", "[n for n in v if n % 2 == 0]"),
        ("drop_first", "drop the first item", "v[1:]"), ("double", "double every number", "[2 * n for n in v]"),
    ],
    "s": [
        ("reverse", "reverse it", "v[::-1]"), ("upper", "put it in upper case", "v.upper()"),
        ("drop_first", "drop the first letter", "v[1:]"), ("repeat_{k}", "repeat it {k} times", "v * {k}"),
        ("drop_{c}", "remove every letter '{c}'", "v.replace('{c}', '')"),
    ],
}  # fmt: skip
_INPUTS = {"x": _number, "numbers": lambda r: [_ints(r, 5)], "s": lambda r: [_words(r)]}


def _two_step_task(rng: random.Random) -> dict:
    arg = rng.choice(list(_STEPS))
    first, second = rng.sample(_STEPS[arg], 2)
    k, c = rng.randint(2, 9), rng.choice("abcdeilmnorst")
    (n1, d1, b1), (n2, d2, b2) = ((t.format(k=k, c=c) for t in step) for step in (first, second))
    name = f"{n1}_then_{n2}"
    source = f"def {name}({arg}):\n    return {b2.replace('v', '(' + b1.replace('v', arg) + ')')}\n"
    namespace = {}
    exec(source, namespace)  # our own reference solution, to compute the expected values
    cases = [_INPUTS[arg](rng) for _ in range(4)]
    checks = "".join(
        f"    assert candidate({', '.join(map(repr, case))}) == {namespace[name](*case)!r}\n" for case in cases
    )
    return {
        "question": f"Write a function {name}({arg}) that takes {arg}, first does this: {d1}; then does this to the "
        f"result: {d2}; and returns what comes out.",
        "answer": source,
        "test": f"def check(candidate):\n{checks}",
        "entry_point": name,
    }


def function_tasks(
    split: str, count: int = 1000, seed: int = 0, two_step: bool = False, harder: bool = False
) -> list[dict]:
    """Seeded small function-writing tasks with HumanEval-style tests (``test``, ``entry_point``); ``test`` is
    disjoint from ``train`` (no task text in both). ``two_step``: each task chains two steps on one value, which
    the embedded model gets right far less often. ``harder``: one step, with less familiar operations (the middle
    item, the sum of the digits, integer division...), which it gets right less than half the time.

    >>> task = function_tasks("test", 1)[0]
    >>> task["question"].startswith("Write a function ") and "def check(candidate)" in task["test"]
    True
    >>> function_tasks("test", two_step=True)[0]["entry_point"].count("_then_")
    1
    >>> function_tasks("test", harder=True)[0]["question"]
    'Write a function sum_to(m) that returns the sum of the whole numbers from 1 to m.'
    """
    make = _two_step_task if two_step else _harder_task if harder else _function_task
    rng, seen, rows = random.Random(seed), set(), []
    wanted = FUNCTIONS_HELD_OUT if split == "test" else FUNCTIONS_HELD_OUT + count
    for _ in range(50 * wanted):  # the task texts are finite: stop when no new one comes
        if len(rows) == wanted:
            break
        task = make(rng)
        if task["question"] not in seen:
            seen.add(task["question"])
            rows.append(task)
    return rows[:FUNCTIONS_HELD_OUT] if split == "test" else rows[FUNCTIONS_HELD_OUT:]
