"""Agent code must not be able to forge a TestSuite pass (issue #14, finding 1).

Every attack below is a solution module for a task whose tests cannot pass honestly: `test_ok`
passes with a correct `add`, `test_impossible` asserts `1 == 2`. Whatever the solution does (write
a forged report to the result pipe, register pytest hooks found through `gc`, rewrite the test
function, skip or xfail it, exit early...), the verdict must be a fail, never a pass.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

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
