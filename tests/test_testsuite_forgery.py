"""Agent code must not be able to forge a TestSuite pass (issue #14, finding 1).

Every attack below is a solution module for a task whose tests cannot pass honestly: `test_ok`
passes with a correct `add`, `test_impossible` asserts `1 == 2`. Whatever the solution does (write
a forged report to the result pipe, register pytest hooks found through `gc`, rewrite the test
function, skip or xfail it, exit early...), the verdict must be a fail, never a pass.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace

import pytest

from honed.verifiers import Limits, Sandbox, TestSuite
from honed.verifiers.sandbox import bwrap_problem
from verifier_helpers import traj

LIMITS = Limits(wall_s=3, cpu_s=3, memory_mb=512, processes=8, disk_mb=16, file_size_mb=4, output_kb=16)

IMPOSSIBLE = """\
import solution


def test_ok():
    assert solution.add(1, 1) == 2


def test_impossible():
    assert 1 == 2
"""

_FORGED = json.dumps(
    {
        "rc": 0,
        "tests": {"passed": 5, "failed": 0, "errors": 0, "skipped": 0},
        "failures": [],
        "outcomes": {
            "test_solution.py::test_ok": "passed",
            "test_solution.py::test_impossible": "passed",
        },
    }
)

_HOOK_PLUGIN = """\
import gc
import pytest


def add(a, b):
    return a + b


class _Plugin:
{methods}


for _obj in gc.get_objects():
    if type(_obj).__name__ == "PytestPluginManager":
        _obj.register(_Plugin(), "honest-looking-plugin")
"""


def _hook(methods: str) -> str:
    return _HOOK_PLUGIN.format(methods=methods)


ATTACKS: dict[str, str | tuple[str, str]] = {
    # The report channel: forge the JSON the zygote reads, then leave before pytest writes its own.
    "pipe-forgery-and-os-exit": f"""\
import os, stat

def add(a, b):
    return a + b

for fd in range(3, 1024):
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode) or stat.S_ISSOCK(os.fstat(fd).st_mode):
            os.write(fd, {_FORGED!r}.encode())
    except OSError:
        pass
os._exit(0)
""",
    # The same through a forked child, while the parent silences its own report and exits 0.
    "forked-child-writes-the-report": f"""\
import os, stat

def add(a, b):
    return a + b

_fds = []
for fd in range(3, 1024):
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            _fds.append(fd)
    except OSError:
        pass
if os.fork() == 0:
    for fd in _fds:
        try:
            os.write(fd, {_FORGED!r}.encode())
        except OSError:
            pass
    os._exit(0)
os.wait()
_null = os.open(os.devnull, os.O_WRONLY)
for fd in _fds:
    os.dup2(_null, fd)
_real_exit = os._exit
os._exit = lambda code: _real_exit(0)
""",
    "forged-json-on-stdout-and-stderr": f"""\
import os

def add(a, b):
    return a + b

for fd in (1, 2):
    os.write(fd, ({_FORGED!r} + "\\n").encode())
os._exit(0)
""",
    # pytest's own machinery, found through gc.
    "gc-hook-rewrites-outcomes": _hook(
        "    @pytest.hookimpl(wrapper=True)\n"
        "    def pytest_runtest_makereport(self, item, call):\n"
        "        report = yield\n"
        "        report.outcome = 'passed'\n"
        "        report.longrepr = None\n"
        "        return report\n"
    ),
    "gc-report-counts-and-pytest-exit-0": """\
import gc
import pytest

def add(a, b):
    return a + b

for _obj in gc.get_objects():
    if type(_obj).__name__ == "_Report":
        _obj.tests["passed"] = 5
        if hasattr(_obj, "outcomes"):
            _obj.outcomes.update({"test_solution.py::test_ok": "passed", "test_solution.py::test_impossible": "passed"})
pytest.exit("done", returncode=0)
""",
    "hook-marks-tests-xfail": _hook(
        "    def pytest_collection_modifyitems(self, items):\n"
        "        for item in items:\n"
        "            item.add_marker(pytest.mark.xfail(reason='forged'))\n"
    ),
    "hook-marks-failing-test-skip": _hook(
        "    def pytest_collection_modifyitems(self, items):\n"
        "        for item in items:\n"
        "            if item.name == 'test_impossible':\n"
        "                item.add_marker(pytest.mark.skip(reason='forged'))\n"
    ),
    "hook-deselects-failing-test": _hook(
        "    def pytest_collection_modifyitems(self, items):\n"
        "        items[:] = [item for item in items if item.name != 'test_impossible']\n"
    ),
    "hook-collects-zero-tests": _hook(
        "    def pytest_collection_modifyitems(self, items):\n        items[:] = []\n"
    ),
    # The test function itself: its code object swapped for a no-op before it runs.
    "test-function-made-a-no-op": """\
import gc

def add(a, b):
    for obj in gc.get_objects():
        if getattr(obj, "__name__", None) == "test_impossible" and hasattr(obj, "__code__"):
            obj.__code__ = (lambda: None).__code__
    return a + b
""",
    # The assert statement: pytest's rewritten asserts raise the builtin name AssertionError.
    "builtins-assertionerror-is-skip": """\
import builtins
import pytest

def add(a, b):
    return a + b

builtins.AssertionError = pytest.skip.Exception
""",
    "settrace-skips-the-test": """\
import sys
import pytest

def add(a, b):
    return a + b

def _tracer(frame, event, arg):
    if event == "call" and frame.f_code.co_name == "test_impossible":
        raise pytest.skip.Exception("forged", _use_item_location=True)
    return None

sys.settrace(_tracer)
""",
    "always-equal-result": (
        """\
class _Anything:
    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False

def add(a, b):
    return _Anything()
""",
        "import solution\n\n\ndef test_impossible():\n    assert solution.add(1, 1) == 3\n",
    ),
    # The test's own assertion, raised inside a callback the solution calls, swallowed there.
    "assertion-in-callback-swallowed": (
        "def visit(items, check):\n    for item in items:\n        try:\n            check(item)\n        except BaseException:\n            pass\n",
        "import solution\n\n\ndef test_impossible():\n    def check(x):\n        assert x == 3\n\n    solution.visit([1, 2], check)\n",
    ),
    # The tests process from outside: its fds (the result pipe) and memory through /proc, ptrace.
    "reach-other-processes-through-proc-and-ptrace": f"""\
import ctypes, os

def add(a, b):
    return a + b

_libc = ctypes.CDLL(None, use_errno=True)
for _pid in [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]:
    _libc.ptrace(16, int(_pid), 0, 0)  # PTRACE_ATTACH
    try:
        _fds = os.listdir(f"/proc/{{_pid}}/fd")
    except OSError:
        _fds = []
    for _fd in _fds:
        try:
            with open(f"/proc/{{_pid}}/fd/{{_fd}}", "wb", buffering=0) as _f:
                _f.write({_FORGED!r}.encode())
        except OSError:
            pass
    try:
        with open(f"/proc/{{_pid}}/mem", "r+b", buffering=0) as _m:
            _m.write(b"x")
    except OSError:
        pass
""",
    # unittest.SkipTest is a skip to pytest: raised by the solution, it must stay a failure.
    "unittest-skiptest-from-the-solution": (
        "import unittest\n\n\ndef add(a, b):\n    if (a, b) == (2, 2):\n        raise unittest.SkipTest('forged')\n    return a + b\n",
        IMPOSSIBLE.replace("assert 1 == 2", "assert solution.add(2, 2) == 5"),
    ),
    "conftest-written-at-import": """\
import os

def add(a, b):
    return a + b

_HOOK = '''
import pytest

@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    report.outcome = "passed"
    report.longrepr = None
    return report
'''
for _d in {os.getcwd(), os.path.dirname(os.path.abspath(__file__)), "/sandbox", "/tmp"}:
    for _root, _dirs, _files in os.walk(_d):
        try:
            with open(os.path.join(_root, "conftest.py"), "w") as f:
                f.write(_HOOK)
        except OSError:
            pass
""",
    "test-file-deleted": """\
import os

def add(a, b):
    return a + b

for _root, _dirs, _files in os.walk("/sandbox"):
    for _name in _files:
        if _name.startswith("test_"):
            try:
                os.rename(os.path.join(_root, _name), os.path.join(_root, "gone.txt"))
            except OSError:
                pass
""",
    "pytest-skip-at-import": "import pytest\n\ndef add(a, b):\n    return a + b\n\npytest.skip('forged', allow_module_level=True)\n",
    "pytest-exit-0-at-import": "import pytest\n\ndef add(a, b):\n    return a + b\n\npytest.exit('forged', returncode=0)\n",
    "os-exit-0-at-import": "import os\n\ndef add(a, b):\n    return a + b\n\nos._exit(0)\n",
    "sys-exit-0-at-import": "import sys\n\ndef add(a, b):\n    return a + b\n\nsys.exit(0)\n",
    "infinite-output": "import sys\n\ndef add(a, b):\n    return a + b\n\nwhile True:\n    sys.stdout.write('{\"rc\": 0}\\n' * 1000)\n",
}


@pytest.fixture(scope="module")
def suite() -> Iterator[TestSuite]:
    problem = bwrap_problem()
    if problem:
        pytest.fail(f"the sandbox tests need bubblewrap: {problem}")
    with Sandbox(LIMITS, size=2) as box:
        yield TestSuite(sandbox=box)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_forged_pass_is_a_fail(suite: TestSuite, attack: str) -> None:
    code, tests = ATTACKS[attack] if isinstance(ATTACKS[attack], tuple) else (ATTACKS[attack], IMPOSSIBLE)
    v = suite.verify(traj(attack, f"```python\n{code}```", tests=tests))
    assert v.passed is False, (v.reason, v.evidence)


def test_an_honest_solution_still_passes(suite: TestSuite) -> None:
    v = suite.verify(
        traj(
            "honest",
            "def add(a, b):\n    return a + b\n",
            tests=IMPOSSIBLE.split("\n\n\ndef test_impossible")[0],
        )
    )
    assert v.passed is True, (v.reason, v.evidence)


# -- honest code keeps working behind the proxies ------------------------------------------------------

HONEST: dict[str, tuple[str, str]] = {
    "classes-methods-iteration": (
        "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n        self.items.append(x)\n        return self\n"
        "    def pop(self):\n        return self.items.pop()\n    def __len__(self):\n        return len(self.items)\n"
        "    def __iter__(self):\n        return iter(self.items)\n    def __contains__(self, x):\n        return x in self.items\n",
        "from solution import Stack\n\n\ndef test_stack():\n    s = Stack().push(1).push(2)\n    assert len(s) == 2 and list(s) == [1, 2] and 2 in s and 5 not in s\n"
        "    assert s.pop() == 2 and s.items == [1]\n    assert isinstance(s, Stack) and s is s.push(3)\n    s.items = [9]\n    assert s.pop() == 9\n",
    ),
    "exceptions-builtin-custom-and-attributes": (
        "class BankError(Exception):\n    pass\n\nclass Insufficient(BankError):\n    def __init__(self, balance):\n        super().__init__(f'only {balance} left')\n        self.balance = balance\n\n"
        "def withdraw(balance, amount):\n    if amount < 0:\n        raise ValueError('negative amount')\n    if amount > balance:\n        raise Insufficient(balance)\n    return balance - amount\n\n"
        "def cli(code):\n    raise SystemExit(code)\n",
        "import pytest\nimport solution\n\n\ndef test_errors():\n    with pytest.raises(ValueError, match='negative'):\n        solution.withdraw(5, -1)\n"
        "    with pytest.raises(solution.BankError, match='only 5 left') as info:\n        solution.withdraw(5, 6)\n"
        "    assert isinstance(info.value, solution.Insufficient) and info.value.balance == 5\n    assert solution.withdraw(5, 2) == 3\n"
        "    with pytest.raises(SystemExit) as exited:\n        solution.cli(2)\n    assert exited.value.code == 2\n",
    ),
    "generators-and-values": (
        "import collections, enum, fractions\n\nPair = collections.namedtuple('Pair', 'first second')\n\nclass Color(enum.IntEnum):\n    RED = 1\n\n"
        "class Mood(str, enum.Enum):\n    HAPPY = 'happy'\n\ndef count(n):\n    yield from range(n)\n\n"
        "def values():\n    return {'a': (1, 2.5), 3: {4, 5}, 'b': b'\\x00\\xff', 'c': None, 'd': [True, 1j], 'big': 2 ** 200}\n\n"
        "def pair():\n    return Pair(1, 2)\n\ndef counts(text):\n    return collections.Counter(text)\n",
        "import pytest\nfrom solution import Color, Mood, count, counts, pair, values\n\n\ndef test_values():\n    assert list(count(3)) == [0, 1, 2]\n    gen = count(2)\n    assert next(gen) == 0 and next(gen) == 1\n"
        "    with pytest.raises(StopIteration):\n        next(gen)\n"
        "    assert values() == {'a': (1, 2.5), 3: {4, 5}, 'b': b'\\x00\\xff', 'c': None, 'd': [True, 1j], 'big': 2 ** 200}\n"
        "    assert pair() == (1, 2) and pair().first == 1 and pair()._asdict() == {'first': 1, 'second': 2}\n"
        "    assert Color.RED == 1 and Color.RED.name == 'RED' and Mood.HAPPY == 'happy'\n"
        "    assert counts('aab') == {'a': 2, 'b': 1} and counts('aab').most_common(1) == [('a', 2)]\n",
    ),
    "callbacks-capsys-monkeypatch-star-import": (
        "def apply(f, items):\n    return [f(x) for x in items]\n\ndef helper():\n    return 1\n\ndef use_helper():\n    return helper() + 1\n\n"
        "def greet(name):\n    print(f'hello {name}')\n\ndef by_length(words):\n    return sorted(words, key=len)\n",
        "from solution import *\nimport solution\n\n\ndef test_callbacks(capsys, monkeypatch):\n    assert apply(lambda x: x * 2, [1, 2]) == [2, 4]\n    assert by_length(['ccc', 'a', 'bb']) == ['a', 'bb', 'ccc']\n"
        "    greet('you')\n    assert capsys.readouterr().out == 'hello you\\n'\n"
        "    monkeypatch.setattr(solution, 'helper', lambda: 41)\n    assert use_helper() == 42\n",
    ),
    "numbers-by-value": (
        "from decimal import Decimal\nfrom fractions import Fraction\n\ndef half():\n    return Fraction(1, 2)\n\n"
        "def price():\n    return Decimal('1.10')\n\ndef huge():\n    return Fraction(3 ** 100, 2 ** 100)\n",
        "from decimal import Decimal\nfrom fractions import Fraction\nfrom solution import half, huge, price\n\n\n"
        "def test_numbers():\n    assert half() == Fraction(1, 2) and half() == 0.5 and price() == Decimal('1.1')\n"
        "    assert huge() == Fraction(3 ** 100, 2 ** 100)\n",
    ),
    "dataclass-context-manager-approx": (
        "import dataclasses, time\n\n@dataclasses.dataclass\nclass Point:\n    x: float\n    y: float\n    def norm(self):\n        return (self.x ** 2 + self.y ** 2) ** 0.5\n\n"
        "class Timer:\n    def __enter__(self):\n        self.start = time.monotonic()\n        return self\n    def __exit__(self, *exc):\n        self.elapsed = time.monotonic() - self.start\n        return False\n\n"
        "def mean(xs):\n    return sum(xs) / len(xs)\n",
        "import pytest\nimport solution\n\n\nclass TestGeometry:\n    def test_point(self):\n        p = solution.Point(3, 4)\n        assert p.norm() == 5 and p == solution.Point(3, 4) and p != solution.Point(0, 0)\n"
        "        assert repr(p) == 'Point(x=3, y=4)'\n\n    @pytest.mark.parametrize('xs', [[1, 2], [1.5, 1.5]])\n    def test_mean(self, xs):\n        assert solution.mean(xs) == pytest.approx(1.5)\n\n\n"
        "def test_timer():\n    with solution.Timer() as t:\n        pass\n    assert t.elapsed >= 0\n",
    ),
}


@pytest.mark.parametrize("case", list(HONEST))
def test_honest_code_passes_behind_the_proxies(suite: TestSuite, case: str) -> None:
    code, tests = HONEST[case]
    v = suite.verify(traj(case, f"```python\n{code}```", tests=tests))
    assert v.passed is True, (v.reason, v.evidence.get("output"))


def test_a_failure_inside_the_solution_shows_its_traceback(suite: TestSuite) -> None:
    code = "def add(a, b):\n    print('adding')\n    return helper(a) + b\n\ndef helper(a):\n    return a + undefined_name\n"
    v = suite.verify(traj("tb", code, tests=IMPOSSIBLE.split("\n\n\ndef test_impossible")[0]))
    assert v.passed is False and "1 of 1 test(s) failed" in v.reason
    output = v.evidence["output"]
    assert "NameError: name 'undefined_name' is not defined" in output and "In the solution process" in output
    assert "solution.py" in output and "adding" in output


MARKER_REVERSED = "9e1c-SDRAWKCAB-tset-nedduh"  # reversed, so the solution's source does not hold it
SNOOP = f"""\
import gc, os, sys

# Everything is searched XOR-ed, and the needle is built XOR-ed from its reversed text: the marker
# itself is never in this process's memory unless it came from outside.
KEY = bytes(b ^ 0x5A for b in range(256))
XNEEDLE = {MARKER_REVERSED!r}.encode().translate(KEY)[::-1]
FOUND = []

# The interpreter's own tree is mounted read-only (under /tmp when the checkout is there): gigabytes
# of libraries that cannot hold the tests, and whose reading would only run the scan out of time.
SKIP = {{os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}}
for top in ("/sandbox", "/tmp", "/dev/shm", os.getcwd()):
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(root, d)) not in SKIP]
        for name in files:
            try:
                if os.path.getsize(os.path.join(root, name)) > 1 << 26:
                    continue  # a model or a library, not a test file
                with open(os.path.join(root, name), "rb") as f:
                    if XNEEDLE in f.read().translate(KEY):
                        FOUND.append(os.path.join(root, name))
            except OSError:
                pass
with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", buffering=0) as mem:
    regions = [line.split() for line in maps]
    for fields in regions:
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if "r" not in fields[1] or end - start > 1 << 30 or (len(fields) > 5 and fields[5].startswith("[v")):
            continue
        # In slices (overlapping by the needle's length): a whole region read at once, then translated,
        # can exceed the sandbox's memory limit, and a MemoryError at import hid every finding.
        step, overlap = 1 << 22, len(XNEEDLE)
        for at in range(start, end, step):
            try:
                mem.seek(at)
                chunk = mem.read(min(step + overlap, end - at))
            except (OSError, OverflowError, ValueError):
                break
            if XNEEDLE in chunk.translate(KEY):
                FOUND.append(fields[0] + " " + (fields[5] if len(fields) > 5 else "anonymous"))
                break
"""


def test_the_solution_never_sees_the_tests(suite: TestSuite) -> None:
    """Neither on disk nor anywhere in the solution process's memory, even when the same task ran
    just before on the same sandbox (the spare solution process is forked between jobs)."""
    tests = f"# {MARKER_REVERSED[::-1]}\nimport solution\n\n\ndef test_nothing_found():\n    assert solution.FOUND == []\n"
    # Reading a whole process's memory takes seconds of CPU: more time than the attacks get, so a
    # busy machine cannot turn "found nothing" into "timed out".
    snooping = TestSuite(sandbox=suite.sandbox, limits=replace(LIMITS, wall_s=60, cpu_s=30))
    for attempt in range(3):
        v = snooping.verify(traj(f"snoop{attempt}", f"```python\n{SNOOP}```", tests=tests))
        if not v.passed and v.reason.startswith(("timed out", "the tests could not be collected")):
            # The scan did not finish on a busy machine (it reads the whole process at import): no
            # finding either way. A scan that finishes and finds the tests fails the assertion below.
            pytest.skip(f"the memory scan did not finish here: {v.reason}")
        assert v.passed is True, (v.reason, v.evidence.get("output"))


# -- the trusted side's cross-check of the report ---------------------------------------------------------


def test_expected_tests_are_read_from_the_file_without_running_it() -> None:
    from honed.verifiers.testsuite import expected_tests, node_name

    source = (
        "import pytest, unittest\n\n@pytest.fixture\ndef test_data():\n    return 1\n\n"
        "def test_a(test_data):\n    pass\n\nasync def test_b():\n    pass\n\ndef helper():\n    pass\n\n"
        "class TestC:\n    def test_d(self):\n        pass\n    def other(self):\n        pass\n\n"
        "class TestWithInit:\n    def __init__(self):\n        pass\n    def test_e(self):\n        pass\n\n"
        "class Cases(unittest.TestCase):\n    def test_f(self):\n        pass\n"
    )
    assert expected_tests(source) == {"test_a", "test_b", "TestC::test_d", "Cases::test_f"}
    assert node_name("test_solution.py::TestC::test_d[1-a]") == "TestC::test_d"
    with pytest.raises(SyntaxError):
        expected_tests("def test(:\n")


def _result(outcomes: dict[str, str], *, rc: int = 0, exit_code: int | None = 0, **kwargs):
    from honed.verifiers.sandbox import SandboxResult

    counts = {"passed": sum(o == "passed" for o in outcomes.values())}
    report = {"rc": rc, "tests": counts, "outcomes": outcomes, "failures": []}
    return SandboxResult(exit_code=exit_code, report=report, limits={"wall_s": 1, "cpu_s": 1}, **kwargs)


@pytest.mark.parametrize(
    ("outcomes", "kwargs", "passed"),
    [
        ({"t.py::test_a": "passed", "t.py::test_b[1]": "passed"}, {}, True),
        ({"t.py::test_a": "passed"}, {}, False),  # test_b never reported: not the file's tests
        ({"t.py::test_a": "passed", "t.py::test_b": "skipped"}, {}, False),
        ({"t.py::test_a": "passed", "t.py::test_b": "xfailed"}, {}, False),
        ({"t.py::test_a": "passed", "t.py::test_b": "xpassed"}, {}, False),
        ({"t.py::test_a": "passed", "t.py::test_b": "passed"}, {"exit_code": 1}, False),
        ({"t.py::test_a": "passed", "t.py::test_b": "passed"}, {"exit_code": None, "signal": 9}, False),
        ({"t.py::test_a": "passed", "t.py::test_b": "passed"}, {"rc": 1}, False),
        ({"t.py::test_a": "passed", "t.py::test_b": "passed"}, {"timed_out": True}, False),
        ({}, {}, False),
    ],
)
def test_a_pass_needs_every_expected_test_passed_rc_0_and_a_clean_exit(outcomes, kwargs, passed) -> None:
    from honed.verifiers.testsuite import judge_run

    v = judge_run(_result(outcomes, **kwargs), {"test_a", "test_b"})
    assert v.passed is passed, v.reason


def test_code_that_kills_its_sandbox_is_never_a_pass(sqlite_url: str) -> None:
    """A QA pass (session 19): the solution killed the sandbox process running it, so the test
    suite's verdict was an error, which did not count, and another verifier's pass made the
    wrong code a training row. An error now leaves the run undecided: neither a pass nor data."""
    import time

    import honed
    from honed.learn.datasets import prepare
    from honed.trajectory import label
    from honed.verifiers import GoalCheck, Worker

    tests = "from solution import add\n\ndef test_add():\n    assert add(2, 3) == 5\n"
    wrong = "def add(a, b):\n    return a - b\n"
    sabotage = (
        "import os, signal\n\ndef add(a, b):\n    os.kill(os.getppid(), signal.SIGKILL)\n    return a - b\n"
    )
    store = honed.open_store(sqlite_url)
    for name, code in (("wrong", wrong), ("sabotage", sabotage)):
        run = traj(name, f"```python\n{code}```", tests=tests)
        store.save(replace(run, task_id=name, split="train"))
    looks_like_code = GoalCheck(lambda state: "def add" in state["answer"], name="has_function")
    with Sandbox(LIMITS, size=1) as box:
        worker = Worker(store, [TestSuite(sandbox=box), looks_like_code], backoff_s=0.05, max_backoff_s=0.1)
        for _ in range(8):
            worker.run_once()
            time.sleep(0.15)
    runs = {t.task_id: t for t in store.trajectories()}
    suite_said = {k: next(v for v in t.verdicts if v.verifier == "tests") for k, t in runs.items()}
    assert suite_said["wrong"].passed is False and suite_said["sabotage"].passed is None, suite_said
    assert "SandboxError" in suite_said["sabotage"].reason, suite_said["sabotage"].reason
    assert all(v.passed for t in runs.values() for v in t.verdicts if v.verifier == "has_function")
    assert label(runs["sabotage"].verdicts) is None and label(runs["wrong"].verdicts) is False
    assert store.count(verdict="pass") == 0
    assert len(prepare(store, "sft").dataset) == 0
