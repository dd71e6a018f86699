"""Run untrusted agent code: bubblewrap namespaces, a seccomp filter, rlimits, and warm pytest.

    >>> with Sandbox(Limits(wall_s=2, memory_mb=256)) as box:
    ...     box.run_pytest({"solution.py": code, "test_solution.py": tests}).passed

What contains a job (the `bwrap` backend, the default):
- **bubblewrap** (Debian `bubblewrap`): new pid, network (loopback only), IPC and UTS namespaces; a
  root filesystem holding only /usr, the Python that runs the tests (read-only) and size-capped
  tmpfs (`/sandbox` for the job, `/tmp`, `/dev/shm`, `disk_mb` each) as the only writable places.
  The store's files, home directories and the worker's working directory are simply not there;
  `hide=` masks any that sit inside a mounted Python prefix. The environment is replaced, so no
  secret reaches the job.
- **an unprivileged uid**: as root, the sandbox drops to a random high uid (util-linux `setpriv`) so
  that RLIMIT_NPROC applies (the kernel never enforces it on root), which requires the worker's
  Python and pytest to be world-readable; otherwise it keeps the caller's uid in a user namespace
  with further user namespaces disabled.
- **seccomp** (`honed.verifiers.seccomp`): no new namespaces, so a job cannot mount an unbounded tmpfs.
- **rlimits per job**: CPU seconds, address space, file size, processes, open files, no core dumps;
  a wall-clock deadline after which the job and everything it started are killed, and the writable
  places emptied.

Each sandbox process is a *zygote* (`honed.verifiers.zygote`): it imports pytest once and forks a
child per job, which makes a sandboxed test run cost ~40 ms of CPU instead of ~0.3 s.

Containment is not enough for a verdict: code in pytest's process could write the report itself or
rewrite outcomes through pytest's hooks. So `run_pytest` runs the `solution` module in a process of
its own (`honed.verifiers.isolation`): pytest, the test file and the report stay in a trusted process
the agent's code cannot reach, and talk to it through proxies.

Fallbacks. bubblewrap needs unprivileged user namespaces or root; util-linux `unshare` needs the same
kernel features, so it is no fallback, and assembling the filesystem view by hand around it is what
bubblewrap exists to do well. Where neither works (some locked-down containers), there is no honest
way to contain hostile code: `backend="none"` still runs jobs in a private temp dir with rlimits, a
scrubbed environment and a wall deadline, but with the host's network, filesystem view and uid. Use it
only for code you trust; `Sandbox()` refuses to start without bubblewrap rather than degrade silently.

Worst-case memory is `processes × memory_mb` per sandbox: rlimits bound processes, not their sum, so
put the worker in a cgroup (`systemd-run --scope -p MemoryMax=4G honed verify --watch`) to bound it
as a whole.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from honed.verifiers.protocol import VerifierError
from honed.verifiers.seccomp import no_new_namespaces_filter

log = logging.getLogger("honed.verifiers")

Backend = Literal["bwrap", "none"]
_ZYGOTE_SOURCE = (Path(__file__).with_name("zygote.py")).read_text(encoding="utf-8")
_ISOLATION_SOURCE = (Path(__file__).with_name("isolation.py")).read_text(encoding="utf-8")
_FRAME = struct.Struct(">II")
_SANDBOX_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "USER": "sandbox",
    "LOGNAME": "sandbox",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONHASHSEED": "0",
    "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    # Threads count against the process limit: keep numeric libraries from starting one per core.
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
_GRACE_S = 10.0
# Plugins a task's tests never need are not loaded: ~10% of a sandboxed run's CPU.
_UNUSED_PLUGINS = ("cacheprovider", "doctest", "junitxml", "pastebin", "legacypath", "stepwise", "setuponly",
                   "setupplan", "debugging", "faulthandler")  # fmt: skip
_PYTEST_ARGS = ["-q", "--tb=short", "--rootdir=.", "-o", "console_output_style=classic"] + [
    arg for name in _UNUSED_PLUGINS for arg in ("-p", f"no:{name}")
]  # beyond a job's wall limit, before the parent gives up on the zygote itself


class SandboxUnavailable(VerifierError):
    """No sandbox can be started here; the message says what to install or enable."""


class SandboxError(VerifierError):
    """The sandbox itself failed (not the code in it); the job is retried as a verifier error."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What one job may use. `memory_mb` is address space per process and `processes` counts
    threads too, so a job's worst case is `processes × memory_mb`. `disk_mb` sizes each sandbox's
    tmpfs (job dir, /tmp, /dev/shm) and is fixed when the sandbox starts; the others apply per job."""

    wall_s: float = 10.0
    cpu_s: float = 10.0
    memory_mb: int = 512
    file_size_mb: int = 16
    disk_mb: int = 64
    processes: int = 16
    open_files: int = 256
    output_kb: int = 32


@dataclass(slots=True)
class SandboxResult:
    """How a job ended. `report` is pytest's outcomes when the job ran pytest and finished: `rc`,
    counts under `tests`, `outcomes` by test id, `failures`. With a solution process, `solution_*`
    say how it ended (None while it was still answering when the tests finished); `cpu_s` counts
    both processes."""

    exit_code: int | None
    signal: int | None = None
    timed_out: bool = False
    output: str = ""
    duration_s: float = 0.0
    cpu_s: float = 0.0
    max_rss_kb: int = 0
    report: dict[str, Any] | None = None
    limits: dict[str, Any] = field(default_factory=dict)
    solution_exit_code: int | None = None
    solution_signal: int | None = None
    solution_cpu_s: float = 0.0

    @property
    def tests(self) -> dict[str, int]:
        return dict((self.report or {}).get("tests") or {})

    @property
    def outcomes(self) -> dict[str, str]:
        """Each test id pytest reported, with its outcome (passed, failed, error, skipped, xfailed, xpassed)."""
        outcomes = (self.report or {}).get("outcomes")
        return {str(k): str(v) for k, v in outcomes.items()} if isinstance(outcomes, dict) else {}

    @property
    def failures(self) -> list[dict[str, str]]:
        return list((self.report or {}).get("failures") or [])

    @property
    def passed(self) -> bool:
        """At least one test ran, every test reported passed (none skipped or xfailed), pytest said
        so, and the tests process exited cleanly with status 0."""
        outcomes = self.outcomes
        return (
            self.exit_code == 0
            and self.signal is None
            and not self.timed_out
            and self.report is not None
            and self.report.get("rc") == 0
            and bool(outcomes)
            and all(outcome == "passed" for outcome in outcomes.values())
        )

    @property
    def limit_hit(self) -> str | None:
        """Which limit ended the job (or its solution process), when one visibly did."""
        if self.timed_out:
            return "wall"
        cpu = self.limits.get("cpu_s", 1e9) - 0.5
        for sig, cpu_s in (
            (self.signal, self.cpu_s - self.solution_cpu_s),
            (self.solution_signal, self.solution_cpu_s),
        ):
            if sig in (signal.SIGXCPU, signal.SIGKILL) and cpu_s >= cpu:
                return "cpu"
        if signal.SIGXFSZ in (self.signal, self.solution_signal) or "File too large" in self.output:
            return "file_size"
        if "MemoryError" in self.output:
            return "memory"
        if "Resource temporarily unavailable" in self.output or "BlockingIOError" in self.output:
            return "processes"
        if "No space left on device" in self.output:
            return "disk"
        return None


class Sandbox:
    """A pool of up to `size` warm sandboxes; `run_pytest`/`run_python` borrow one per job.

    Thread-safe. Sandboxes start on first use (about 0.3 s each) and are replaced when one dies.
    `hide` lists host paths (the store's database file or directory) that must stay invisible even
    if they lie inside a mounted Python prefix.
    """

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        size: int | None = None,
        backend: Backend = "bwrap",
        hide: Iterable[str | os.PathLike[str]] = (),
        python: str | None = None,
        start_timeout_s: float = 60.0,
    ) -> None:
        if backend not in ("bwrap", "none"):
            raise ValueError(f"backend must be 'bwrap' or 'none', not {backend!r}")
        self.limits = limits or Limits()
        self.size = max(1, size or os.cpu_count() or 1)
        self.backend: Backend = backend
        self.python = python or sys.executable
        self.start_timeout_s = start_timeout_s
        self._hidden: set[str] = {os.path.abspath(p) for p in hide}
        self._idle: list[_Zygote] = []
        self._count = 0
        self._closed = False
        self._cond = threading.Condition()
        # Zygotes die with the thread that started them (PR_SET_PDEATHSIG): start them all from
        # one long-lived thread, never from a short-lived caller.
        self._spawner = _Spawner()
        _live_sandboxes.add(self)

    # -- public ----------------------------------------------------------------------------

    def run_pytest(
        self,
        files: Mapping[str, str],
        *,
        test_file: str = "test_solution.py",
        solution: str | None = "solution.py",
        limits: Limits | None = None,
    ) -> SandboxResult:
        """Write `files` into a fresh directory and run pytest on `test_file` there.

        `solution` (when it is one of `files`) is the untrusted module: it runs in a process of its
        own, behind proxies, and cannot touch pytest, the test file or the report (see
        `honed.verifiers.isolation`). Every other file is trusted and runs in pytest's process.
        """
        job: dict[str, Any] = {"files": dict(files), "run": "pytest", "args": [*_PYTEST_ARGS, test_file]}
        if solution is not None and solution in files:
            if not solution.endswith(".py") or not solution[:-3].isidentifier() or solution == test_file:
                raise ValueError(
                    f"solution must name a Python module file other than the tests, not {solution!r}"
                )
            job.update(solution=solution, test_file=test_file)
        return self._run(job, limits)

    def run_python(
        self,
        files: Mapping[str, str],
        *,
        main: str = "main.py",
        args: Iterable[str] = (),
        limits: Limits | None = None,
    ) -> SandboxResult:
        """Write `files` into a fresh directory and run `main` there as `__main__`."""
        return self._run({"files": dict(files), "run": "python", "args": [main, *args]}, limits)

    def hide(self, *paths: str | os.PathLike[str]) -> None:
        """Keep more host paths out of the sandbox; running sandboxes are replaced."""
        new = {os.path.abspath(p) for p in paths} - self._hidden
        if new:
            self._hidden |= new
            self._drain_idle()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._drain_idle()
        self._spawner.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- pool ------------------------------------------------------------------------------

    def _run(self, job: dict[str, Any], limits: Limits | None) -> SandboxResult:
        limits = limits or self.limits
        job["limits"] = asdict(limits)
        zygote = self._acquire()
        healthy = False
        try:
            reply = zygote.request(job, limits.wall_s + _GRACE_S)
            if "sandbox_error" in reply:
                raise SandboxError(f"the sandbox failed to run the job: {reply['sandbox_error']}")
            healthy = True
        finally:
            self._release(zygote, healthy)
        reply.pop("sandbox_error", None)
        known = set(SandboxResult.__dataclass_fields__)
        return SandboxResult(**{k: v for k, v in reply.items() if k in known}, limits=asdict(limits))

    def _acquire(self) -> _Zygote:
        with self._cond:
            while True:
                if self._closed:
                    raise SandboxError("the sandbox is closed")
                if self._idle:
                    return self._idle.pop()
                if self._count < self.size:
                    self._count += 1
                    break
                self._cond.wait()
        try:
            return self._spawner.call(self._start)
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def _release(self, zygote: _Zygote, healthy: bool) -> None:
        with self._cond:
            if healthy and not self._closed and zygote.hidden == frozenset(self._hidden):
                self._idle.append(zygote)
                self._cond.notify()
                return
            self._count -= 1
            self._cond.notify()
        zygote.kill()

    def _drain_idle(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for zygote in idle:
            zygote.kill()

    def _start(self) -> _Zygote:
        hidden = frozenset(self._hidden)
        if self.backend == "none":
            return _start_unsandboxed(self.python, hidden, self.start_timeout_s)
        return _start_bwrap(self.python, self.limits, hidden, self.start_timeout_s)


# -- starting sandboxes ------------------------------------------------------------------------


def bwrap_problem() -> str | None:
    """Why the bwrap backend cannot work here, or None when it should."""
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed: `apt-get install bubblewrap` (or dnf/apk install bubblewrap)"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    return None


def _start_bwrap(python: str, limits: Limits, hidden: frozenset[str], timeout: float) -> _Zygote:
    problem = bwrap_problem()
    if problem:
        raise SandboxUnavailable(problem)
    argv, pass_fds = _bwrap_argv(python, limits, hidden)
    config = {
        "work": "/sandbox",
        "scratch": ["/tmp", "/dev/shm"],
        "contained": True,
        "isolation": _ISOLATION_SOURCE,
    }
    argv += [python, "-I", "-c", _ZYGOTE_SOURCE, json.dumps(config)]
    try:
        return _Zygote(argv, pass_fds=pass_fds, env=_SANDBOX_ENV, hidden=hidden, timeout=timeout)
    finally:
        for fd in pass_fds:
            os.close(fd)


def _bwrap_argv(python: str, limits: Limits, hidden: frozenset[str]) -> tuple[list[str], tuple[int, ...]]:
    disk = str(max(1, limits.disk_mb) << 20)
    argv = ["setpriv", "--pdeathsig", "KILL", "--", "bwrap"]
    argv += ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    argv += ["--die-with-parent", "--new-session"]
    root = os.geteuid() == 0
    if root:
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--disable-userns"]
    argv += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    # The writable tmpfs first: a Python prefix under /tmp is then mounted on top, not hidden.
    argv += ["--proc", "/proc", "--dev", "/dev"]
    argv += ["--perms", "1777", "--size", disk, "--tmpfs", "/dev/shm"]
    argv += ["--perms", "1777", "--size", disk, "--tmpfs", "/tmp"]
    argv += ["--perms", "1777", "--size", disk, "--tmpfs", "/sandbox"]
    binds = _python_roots(python)
    for directory in _ancestors(binds):
        argv += ["--perms", "0755", "--dir", directory]
    for path in binds:
        argv += ["--ro-bind", path, path]
    for path in sorted(hidden):
        if any(_inside(path, b) for b in binds) and os.path.exists(path):
            argv += ["--tmpfs", path] if os.path.isdir(path) else ["--ro-bind", "/dev/null", path]
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    argv += ["--chdir", "/sandbox", "--clearenv"]
    for key, value in {**_SANDBOX_ENV, "HOME": "/sandbox", "TMPDIR": "/tmp"}.items():
        argv += ["--setenv", key, value]
    pass_fds: list[int] = []
    program = no_new_namespaces_filter()
    if program is not None:
        fd = os.memfd_create("honed-seccomp", 0)
        os.write(fd, program)
        os.lseek(fd, 0, os.SEEK_SET)
        pass_fds.append(fd)
        argv += ["--seccomp", str(fd)]
    argv.append("--")
    if root:
        uid = str(100_000 + secrets.randbelow(900_000))  # its own uid: RLIMIT_NPROC counts per uid
        argv += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all", "--"]
    return argv, tuple(pass_fds)


def _start_unsandboxed(python: str, hidden: frozenset[str], timeout: float) -> _Zygote:
    root = tempfile.mkdtemp(prefix="honed-unsandboxed-")
    work, tmp = os.path.join(root, "work"), os.path.join(root, "tmp")
    os.mkdir(work, 0o700)
    os.mkdir(tmp, 0o700)
    config = {"work": work, "scratch": [tmp], "contained": False, "isolation": _ISOLATION_SOURCE}
    env = {**_SANDBOX_ENV, "HOME": work, "TMPDIR": tmp}
    argv = [python, "-I", "-c", _ZYGOTE_SOURCE, json.dumps(config)]
    return _Zygote(argv, pass_fds=(), env=env, hidden=hidden, timeout=timeout, cwd=work, cleanup=root)


def _python_roots(python: str) -> list[str]:
    """The directories the sandboxed Python needs, outermost only, none under /usr."""
    try:
        import pytest
    except ImportError as exc:
        raise SandboxUnavailable(f"pytest is not installed for {python}: the test sandbox runs it") from exc
    candidates = {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        os.path.dirname(os.path.dirname(os.path.abspath(python))),
        os.path.dirname(os.path.dirname(os.path.realpath(python))),
        os.path.dirname(os.path.dirname(pytest.__file__)),
    }
    paths = {p for c in candidates for p in (os.path.abspath(c), os.path.realpath(c)) if os.path.isdir(p)}
    paths = {p for p in paths if not _inside(p, "/usr") and p != "/"}
    return sorted(p for p in paths if not any(p != q and _inside(p, q) for q in paths))


def _ancestors(paths: Iterable[str]) -> list[str]:
    out: set[str] = set()
    for path in paths:
        parent = os.path.dirname(path)
        while parent not in ("/", "") and not _inside(parent, "/usr"):
            out.add(parent)
            parent = os.path.dirname(parent)
    return sorted(out, key=lambda p: (p.count("/"), p))


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


# -- one sandbox process ------------------------------------------------------------------------


class _Zygote:
    """The parent's handle on one sandbox process: JSON lines over its stdin/stdout."""

    def __init__(
        self,
        argv: list[str],
        *,
        pass_fds: tuple[int, ...],
        env: Mapping[str, str],
        hidden: frozenset[str],
        timeout: float,
        cwd: str | None = None,
        cleanup: str | None = None,
    ) -> None:
        self.hidden, self._cleanup = hidden, cleanup
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in kill()
        self._buffer = b""
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            pass_fds=pass_fds,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
        try:
            hello = self._read_message(timeout)
        except SandboxError as exc:
            self.kill()
            raise SandboxUnavailable(f"the sandbox did not start: {exc}") from None
        if not hello.get("ready"):
            self.kill()
            raise SandboxUnavailable(f"the sandbox did not start: {hello}")

    def request(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        header = dict(job)
        blobs = [text.encode("utf-8") for text in job["files"].values()]
        header["files"] = [[name, len(blob)] for name, blob in zip(job["files"], blobs, strict=True)]
        head = json.dumps(header).encode()
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(_FRAME.pack(len(head), sum(map(len, blobs))) + head + b"".join(blobs))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise SandboxError(f"the sandbox process is gone: {exc}; {self._stderr_tail()}") from exc
        reply, payload = self._read_frame(timeout)
        if "output_size" in reply:
            size, dropped = int(reply.pop("output_size")), int(reply.pop("output_dropped", 0))
            report_size = int(reply.pop("report_size", 0))
            text = payload[:size].decode("utf-8", "replace")
            reply["output"] = f"[… {dropped} bytes cut …]\n{text}" if dropped else text
            report = payload[size : size + report_size]
            try:
                reply["report"] = json.loads(report.decode("utf-8", "replace")) if report else None
            except ValueError:
                reply["report"] = None
        return reply

    def _read_message(self, timeout: float) -> dict[str, Any]:
        return self._read_frame(timeout)[0]

    def _read_frame(self, timeout: float) -> tuple[dict[str, Any], bytes]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            need = _FRAME.size
            while True:
                if len(self._buffer) >= _FRAME.size:
                    header_size, payload_size = _FRAME.unpack_from(self._buffer)
                    need = _FRAME.size + header_size + payload_size
                    if len(self._buffer) >= need:
                        break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise SandboxError(f"no answer from the sandbox within {timeout:g}s")
                data = os.read(fd, max(1 << 16, need - len(self._buffer)))
                if not data:
                    raise SandboxError(f"the sandbox process exited: {self._stderr_tail()}")
                self._buffer += data
        frame, self._buffer = self._buffer[:need], self._buffer[need:]
        header = frame[_FRAME.size : _FRAME.size + header_size]
        return json.loads(header), frame[_FRAME.size + header_size :]

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            return self._stderr.read()[-2000:].decode("utf-8", "replace").strip() or "(no output)"
        except (OSError, ValueError):
            return "(no output)"

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a zombie we cannot reap
            log.warning("honed: sandbox process %s did not exit after SIGKILL", self.proc.pid)
        for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        if self._cleanup:
            shutil.rmtree(self._cleanup, ignore_errors=True)


class _Spawner:
    """One long-lived thread that starts every sandbox process (see `Sandbox.__init__`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._jobs: list[tuple[Any, list[Any], threading.Event]] = []
        self._wake = threading.Condition(self._lock)
        self._closed = False

    def call(self, fn: Any) -> Any:
        box: list[Any] = []
        done = threading.Event()
        with self._lock:
            if self._closed:
                raise SandboxError("the sandbox is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="honed-sandbox-spawner", daemon=True)
                self._thread.start()
            self._jobs.append((fn, box, done))
            self._wake.notify()
        done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._jobs and not self._closed:
                    self._wake.wait()
                if not self._jobs:
                    return
                fn, box, done = self._jobs.pop(0)
            try:
                box.append((True, fn()))
            except BaseException as exc:
                box.append((False, exc))
            done.set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify_all()


_live_sandboxes: weakref.WeakSet[Sandbox] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for box in list(_live_sandboxes):
        box.close()


__all__ = ["Limits", "Sandbox", "SandboxError", "SandboxResult", "SandboxUnavailable", "bwrap_problem"]
