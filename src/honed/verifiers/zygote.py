"""The process that runs *inside* the sandbox: import pytest once, then fork one contained child per job.

Why a zygote: importing pytest costs ~0.2 s of CPU, which alone would cap a 2-core machine at ~8
sandboxed test runs a second. Forking a warm process costs a millisecond, and with the preloaded heap
frozen out of the garbage collector's sight (`gc.freeze`) a child does not copy it just to scan it,
which takes another third off each run's CPU. Each child runs one job in a fresh directory under its
own rlimits and is killed with everything it spawned when it ends or runs out of time; the writable
places are emptied after every job, so jobs never share processes or files.

Stand-alone on purpose (stdlib only): honed itself is not mounted in the sandbox. The parent passes
this file's source with `python -I -c` and a JSON config as argv[1]. Protocol, JSON lines: the zygote
says `{"ready": ...}`, then for every job line `{"files", "run": "pytest"|"python", "args", "limits"}`
it answers one result line.
"""

import contextlib
import ctypes
import gc
import json
import os
import resource
import select
import shutil
import signal
import sys
import time
import traceback

_PR_SET_DUMPABLE = 4
_MAX_RESULT_BYTES = 1 << 20
_MB = 1 << 20


def main() -> None:
    config = json.loads(sys.argv[1])
    work, contained = config["work"], bool(config["contained"])
    scratch = [work, *config["scratch"]]  # emptied after every job
    # A fork bomb's leftovers are killed with kill(-1): only ever inside a fresh pid namespace,
    # where the zygote is one of the first pids. Outside one, kill(-1) would hit the whole host.
    contained = contained and os.getpid() <= 3
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    _set_dumpable(False)  # jobs run as our uid: they must not ptrace us
    _preload()
    gc.collect()
    gc.freeze()  # forked jobs then do not copy the preloaded heap just to scan it
    _send(proto_out, {"ready": True, "pid": os.getpid(), "uid": os.getuid(), "contained": contained})
    for n, line in enumerate(proto_in, 1):
        try:
            result = _run_job(json.loads(line), n, work, contained)
        except Exception:
            result = {"sandbox_error": traceback.format_exc()[-4000:]}
        _send(proto_out, result)
        _clean(scratch)  # before reading the next job


def _preload() -> None:
    import importlib
    import pkgutil
    import runpy  # noqa: F401

    import _pytest
    import pytest  # noqa: F401

    for module in pkgutil.walk_packages(_pytest.__path__, "_pytest."):
        with contextlib.suppress(Exception):
            importlib.import_module(module.name)


def _run_job(job: dict, n: int, work: str, contained: bool) -> dict:
    limits = job["limits"]
    jobdir = os.path.join(work, f"job{n}")
    os.mkdir(jobdir, 0o700)
    for name, text in job["files"].items():
        if os.sep in name or name.startswith("."):
            raise ValueError(f"bad file name {name!r}")
        with open(os.path.join(jobdir, name), "w", encoding="utf-8") as f:
            f.write(text)
    out_r, out_w = os.pipe()
    result_r, result_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(out_r)
        os.close(result_r)
        _child(job, jobdir, out_w, result_w)
    os.close(out_w)
    os.close(result_w)
    output = _Tail(int(limits["output_kb"]) * 1024)
    try:
        timed_out, payload = _watch(pid, out_r, output, result_r, start + float(limits["wall_s"]))
        # Outside a pid namespace the group must die while the unreaped child still holds its id.
        if timed_out or not contained:
            _kill_leftovers(pid, contained)
        _, status, usage = os.wait4(pid, 0)
        if contained:
            _kill_leftovers(pid, contained)  # whatever it left running
        payload += _drain(result_r)
        output.add(_drain(out_r))
    finally:
        os.close(result_r)
        os.close(out_r)
    result = {
        "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "timed_out": timed_out,
        "duration_s": time.monotonic() - start,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "max_rss_kb": usage.ru_maxrss,
        "output": output.text(),
    }
    try:
        result["report"] = json.loads(payload.decode("utf-8", "replace")) if payload else None
    except ValueError:
        result["report"] = None
    return result


def _child(job: dict, jobdir: str, out_fd: int, result_fd: int) -> None:
    code = 70
    try:
        os.setsid()
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.closerange(3, result_fd)
        os.closerange(result_fd + 1, 1 << 16)
        _set_dumpable(True)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        _apply_limits(job["limits"])
        os.chdir(jobdir)
        sys.dont_write_bytecode = True
        if job["run"] == "pytest":
            code = _run_pytest(job["args"], result_fd)
        else:
            code = _run_python(job["args"], jobdir)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 70
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        os._exit(code & 0xFF)


class _Report:
    """A pytest plugin counting outcomes, so the verdict does not depend on parsing terminal text."""

    def __init__(self) -> None:
        self.tests = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
        self.failures: list[dict] = []

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.tests["errors"] += 1
            self._keep(report.nodeid or "collection", report)

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call":
            key = "passed" if report.passed else "failed" if report.failed else "skipped"
            self.tests[key] += 1
            if report.failed:
                self._keep(report.nodeid, report)
        elif report.failed:
            self.tests["errors"] += 1
            self._keep(f"{report.nodeid} ({report.when})", report)
        elif report.skipped and report.when == "setup":
            self.tests["skipped"] += 1

    def _keep(self, test: str, report) -> None:
        if len(self.failures) < 10:
            self.failures.append({"test": test, "message": str(report.longrepr)[-4000:]})


def _run_pytest(args: list, result_fd: int) -> int:
    import pytest

    report = _Report()
    rc = int(pytest.main(list(args), plugins=[report]))
    data = json.dumps({"rc": rc, "tests": report.tests, "failures": report.failures}).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(result_fd, view) :]
    return rc


def _run_python(args: list, jobdir: str) -> int:
    import runpy

    sys.argv = list(args)
    sys.path.insert(0, jobdir)
    runpy.run_path(args[0], run_name="__main__")
    return 0


def _apply_limits(limits: dict) -> None:
    def cap(which: int, soft: int, hard: int | None = None) -> None:
        _, current = resource.getrlimit(which)
        hard = soft if hard is None else hard
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(which, (soft, hard))

    cpu = max(1, int(limits["cpu_s"]))
    cap(resource.RLIMIT_CPU, cpu, cpu + 1)  # SIGXCPU first, SIGKILL a second later
    cap(resource.RLIMIT_AS, int(limits["memory_mb"]) * _MB)
    cap(resource.RLIMIT_FSIZE, int(limits["file_size_mb"]) * _MB)
    cap(resource.RLIMIT_NPROC, int(limits["processes"]))
    cap(resource.RLIMIT_NOFILE, int(limits["open_files"]))
    cap(resource.RLIMIT_CORE, 0)


def _watch(pid: int, out_fd: int, output: "_Tail", result_fd: int, deadline: float) -> tuple[bool, bytes]:
    """Wait for the child to exit or the deadline, reading its output and report meanwhile (a
    full pipe would otherwise block it)."""
    pidfd = os.pidfd_open(pid)
    chunks, size, open_fds = [], 0, {out_fd, result_fd}
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True, b"".join(chunks)
            ready, _, _ = select.select([pidfd, *open_fds], [], [], remaining)
            for fd in ready:
                if fd == pidfd:
                    continue
                data = os.read(fd, 65536)
                if not data:
                    open_fds.discard(fd)
                elif fd == out_fd:
                    output.add(data)
                elif size < _MAX_RESULT_BYTES:
                    chunks.append(data)
                    size += len(data)
            if pidfd in ready:
                return False, b"".join(chunks)
    finally:
        os.close(pidfd)


class _Tail:
    """The last `limit` bytes of a stream, and how many were dropped before them."""

    def __init__(self, limit: int) -> None:
        self.limit, self.dropped, self.data = limit, 0, bytearray()

    def add(self, data: bytes) -> None:
        self.data += data
        extra = len(self.data) - self.limit
        if extra > 0:
            del self.data[:extra]
            self.dropped += extra

    def text(self) -> str:
        text = self.data.decode("utf-8", "replace")
        return f"[… {self.dropped} bytes cut …]\n{text}" if self.dropped else text


def _kill_leftovers(pid: int, contained: bool) -> None:
    """Kill the child and everything it started (daemons, fork bombs)."""
    if not contained:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(-1, signal.SIGKILL)  # every process we may signal but ourselves and pid 1
        except ProcessLookupError:
            return
        if not _live_others():
            return
        time.sleep(0.005)


def _live_others() -> bool:
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (1, me):
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in (b"Z", b"X"):
            return True
    return False


def _drain(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    try:
        while len(chunks) < 32:
            data = os.read(fd, 65536)
            if not data:
                break
            chunks.append(data)
    except BlockingIOError:
        pass
    return b"".join(chunks)


def _clean(roots: list) -> None:
    """Empty the writable places (job dirs, temp dirs, shared memory): nothing survives a job."""

    def fix(func, path, _exc) -> None:
        try:
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            func(path)
        except OSError:
            pass

    for root in roots:
        for entry in _listdir(root):
            path = os.path.join(root, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, onerror=fix)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)


def _listdir(path: str) -> list:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _set_dumpable(value: bool) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, int(value), 0, 0, 0)


def _send(out, message: dict) -> None:
    out.write(json.dumps(message).encode() + b"\n")


if __name__ == "__main__":
    main()
