"""`TestSuite`: run the task's pytest tests against the code the agent produced, in the sandbox.

The code is the last fenced Python block of the final answer (else the whole answer), or with
`tool=` the named tool call's argument. It is written as `solution.py` beside the task's tests
(`metadata["tests"]`, pytest source that imports from `solution`) as `test_solution.py`, in a fresh
directory of a `honed.verifiers.sandbox.Sandbox`.

The agent's code cannot forge a pass: it runs in a process of its own behind proxies
(`honed.verifiers.isolation`), away from pytest, the test file and the report, which a trusted
process writes to a pipe the code never holds. The verdict is still checked against what this side
knows: the test functions in `metadata["tests"]` (read here with `ast`, without running anything).

Outcomes: pass only when the tests process exited cleanly with status 0, pytest said 0, every test it
reported passed (none skipped, xfailed or xpassed) and every test function of the file is among them;
failures, errors, skips, a crash or a limit hit (the code looped, forked, allocated or wrote too much)
→ fail, with the failing tests' output as evidence; no tests in the task, or tests that are not valid
Python → undecided. When the sandbox itself cannot run, `SandboxError` propagates and the worker
records an error and retries: a broken sandbox is never a verdict on the agent.
"""

from __future__ import annotations

import ast
import re
import threading
from collections.abc import Iterable
from typing import Any

from honed.trajectory import Trajectory, Verdict
from honed.verifiers.outcome import agent_failed, final_answer, last_code_block, reference, tool_call_args
from honed.verifiers.protocol import BaseVerifier, CannotTell, verdict
from honed.verifiers.sandbox import Limits, Sandbox, SandboxResult

_NO_TESTS, _INTERRUPTED, _INTERNAL_ERROR, _USAGE_ERROR = 5, 2, 3, 4


class TestSuite(BaseVerifier):
    """Pytest in a sandbox; `limits` bound each run, `sandbox` may be shared between verifiers."""

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(
        self,
        *,
        tool: str | None = None,
        arg: str | None = None,
        tests_key: str = "tests",
        limits: Limits | None = None,
        sandbox: Sandbox | None = None,
        name: str = "tests",
        version: str = "1",
        tags: Iterable[str] = (),
    ) -> None:
        self.tool, self.arg, self.tests_key = tool, arg, tests_key
        self.limits = limits or (sandbox.limits if sandbox else Limits())
        self.timeout_s = self.limits.wall_s + 30  # the sandbox enforces the real deadline
        self.name, self.version, self.tags = name, version, frozenset(tags)
        self._sandbox, self._owns_sandbox = sandbox, sandbox is None
        self._lock = threading.Lock()

    @property
    def sandbox(self) -> Sandbox:
        with self._lock:  # the worker calls verify from several threads at once
            if self._sandbox is None:
                self._sandbox = Sandbox(self.limits)
            return self._sandbox

    def applies_to(self, trajectory: Trajectory) -> bool:
        return self.tests_key in (trajectory.metadata or {})

    def prepare(self, store: Any) -> None:
        """Keep the store's files out of the sandbox even if they sit beside the Python it mounts."""
        self.sandbox.hide(*store_files(store))

    def check(self, t: Trajectory) -> Verdict:
        failed = agent_failed(t)
        if failed is not None:
            return verdict(False, f"the agent run failed: {failed}"[:500], agent_error=failed[:2000])
        tests = reference(t, self.tests_key)
        if not isinstance(tests, str) or not tests.strip():
            raise CannotTell(f"metadata[{self.tests_key!r}] must be pytest source text")
        try:
            expected = expected_tests(tests)
        except SyntaxError as exc:
            raise CannotTell(f"metadata[{self.tests_key!r}] is not valid Python: {exc}") from None
        code = self._code(t)
        if code is None:
            return verdict(False, f"the agent never called {self.tool!r}", tool=self.tool)
        if not isinstance(code, str):  # what the agent sent decides nothing: it failed to submit code
            return verdict(
                False, f"the call of {self.tool!r} has no string argument {self.arg or ''!r}".strip()
            )
        if not code.strip():
            return verdict(False, "the agent produced no code")
        result = self.sandbox.run_pytest(
            {"solution.py": code, "test_solution.py": tests}, solution="solution.py", limits=self.limits
        )
        return judge_run(result, expected)

    def close(self) -> None:
        with self._lock:
            if self._owns_sandbox and self._sandbox is not None:
                self._sandbox.close()
                self._sandbox = None

    def _code(self, t: Trajectory) -> Any:
        if self.tool is None:
            answer = final_answer(t)
            block = last_code_block(answer)
            return answer if block is None else block
        args = tool_call_args(t, self.tool)
        if args is None:
            return None
        value = (
            args.get(self.arg) if self.arg else next((v for v in args.values() if isinstance(v, str)), None)
        )
        return value


def expected_tests(source: str) -> set[str]:
    """The tests pytest will collect from `source`, as `name` or `Class::name`, read with `ast`:
    top-level `test*` functions, and the `test*` methods of `Test*` classes (without `__init__`) and
    of `unittest.TestCase` subclasses; fixtures are not tests. Raises SyntaxError."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if node.name.startswith("test") and not _is_fixture(node):
                names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            methods = [n for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
            testcase = any(ast.unparse(base).endswith("TestCase") for base in node.bases)
            if testcase or (node.name.startswith("Test") and all(m.name != "__init__" for m in methods)):
                names |= {
                    f"{node.name}::{m.name}"
                    for m in methods
                    if m.name.startswith("test") and not _is_fixture(m)
                }
    return names


def _is_fixture(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if ast.unparse(target).rsplit(".", 1)[-1] == "fixture":
            return True
    return False


_PARAMETERS = re.compile(r"\[.*\]$", re.DOTALL)


def node_name(node_id: str) -> str:
    """`test_solution.py::TestX::test_y[1-2]` → `TestX::test_y`."""
    return _PARAMETERS.sub("", node_id.split("::", 1)[-1])


def judge_run(result: SandboxResult, expected: set[str] | None = None) -> Verdict:
    """A sandboxed pytest run as a verdict (see the module docstring for the rules); `expected` are
    the test names the file defines (`expected_tests`), every one of which must have passed."""
    tests = result.tests
    ran = tests.get("passed", 0) + tests.get("failed", 0) + tests.get("errors", 0)
    evidence: dict[str, Any] = {
        "tests": tests,
        "exit_code": result.exit_code,
        "signal": result.signal,
        "limit": result.limit_hit,
        "duration_s": round(result.duration_s, 3),
        "cpu_s": round(result.cpu_s, 3),
        "max_rss_kb": result.max_rss_kb,
    }
    if result.solution_signal is not None:
        evidence["solution_signal"] = result.solution_signal
    outcomes = result.outcomes
    if result.passed:
        passed = {node_name(node) for node in outcomes}
        missing = sorted((expected or set()) - passed)
        if not missing:
            return verdict(True, f"{len(outcomes)} test(s) passed", **evidence)
        evidence["missing"] = missing[:20]
        return verdict(
            False,
            f"test(s) of the file never reported as passed: {', '.join(missing[:5])}",
            score=0.0,
            **evidence,
        )
    evidence["output"] = result.output[-8000:]
    evidence["failures"] = result.failures
    if result.timed_out:
        return verdict(
            False, f"timed out after {result.limits.get('wall_s')}s (the code did not finish)", **evidence
        )
    report = result.report
    if report is None:
        how = f"signal {result.signal}" if result.signal else f"exit code {result.exit_code}"
        hit = f" ({result.limit_hit} limit)" if result.limit_hit else ""
        return verdict(False, f"the test run ended abnormally: {how}{hit}", **evidence)
    rc = report.get("rc")
    if rc == _NO_TESTS:
        return verdict(None, "no tests collected: metadata['tests'] defines no test functions", **evidence)
    if rc == _USAGE_ERROR:
        return verdict(None, "pytest rejected its command line (a honed bug, please report it)", **evidence)
    first = result.failures[0]["test"] if result.failures else "?"
    gone = report.get("solution_gone")
    if gone:
        if result.solution_signal is not None:
            how = f"signal {result.solution_signal}"
        elif result.solution_exit_code is not None:
            how = f"exit code {result.solution_exit_code}"
        else:
            how = "still running"
        hit = f", {result.limit_hit} limit" if result.limit_hit else ""
        return verdict(
            False, f"the solution process stopped answering ({how}{hit}): {gone}; first failure: {first}",
            score=tests.get("passed", 0) / ran if ran else 0.0, **evidence,
        )  # fmt: skip
    not_run = sorted(
        node for node, outcome in outcomes.items() if outcome in ("skipped", "xfailed", "xpassed")
    )
    if rc == 0 and not_run and not tests.get("failed") and not tests.get("errors"):
        evidence["not_passed"] = not_run[:20]
        return verdict(
            False, f"{len(not_run)} test(s) skipped or xfailed, first: {not_run[0]}: a pass needs every test to pass",
            score=tests.get("passed", 0) / max(1, len(outcomes)), **evidence,
        )  # fmt: skip
    if rc == _INTERNAL_ERROR:
        return verdict(False, "the code broke the test harness (pytest internal error)", **evidence)
    score = tests.get("passed", 0) / ran if ran else 0.0
    failed = tests.get("failed", 0) + tests.get("errors", 0)
    if rc == _INTERRUPTED and not tests.get("passed", 0) + tests.get("failed", 0):
        return verdict(False, f"the tests could not be collected: {first}", score=0.0, **evidence)
    return verdict(False, f"{failed} of {ran} test(s) failed, first: {first}", score=score, **evidence)


def store_files(store: Any) -> list[str]:
    """The files behind a SQLite store (database, WAL, shared memory, journal); none for a server."""
    engine = getattr(store, "engine", None)
    if engine is None or engine.dialect.name != "sqlite":
        return []
    database = engine.url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return []
    return [database + suffix for suffix in ("", "-wal", "-shm", "-journal")]
