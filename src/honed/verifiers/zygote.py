"""The process that runs *inside* the sandbox: import pytest once, then fork contained children per job.

Why a zygote: importing pytest costs ~0.2 s of CPU, which alone would cap a 2-core machine at ~8
sandboxed test runs a second. Forking a warm process costs a millisecond, and with the preloaded heap
frozen out of the garbage collector's sight (`gc.freeze`) a child does not copy it just to scan it,
which takes another third off each run's CPU. Each child runs one job in a fresh directory under its
own rlimits and is killed with everything it spawned when it ends or runs out of time; the writable
places are emptied after every job, so jobs never share processes or files.

A pytest job with a `solution` file is two processes (see `isolation`): the *tests process*, which
runs pytest and the reporter and writes the verdict to a pipe only it holds, and the *solution
process*, which imports the agent's code and answers the tests' requests over a socket. The solution
process is forked before the job is read (a spare is kept between jobs), so neither the test file
nor anything of an earlier job is in its memory: this process never holds a job's files, output or
report in Python strings, only in buffers it zeroes after each job. The tests process stays
non-dumpable, so the solution process cannot ptrace it or open its `/proc/<pid>/fd`.

Stand-alone on purpose (stdlib only): honed itself is not mounted in the sandbox. The parent passes
this file's source with `python -I -c` and a JSON config as argv[1] (with `isolation`'s source in
it). Protocol, frames of `>II` (header length, payload length), a JSON header and a payload: the
zygote says `{"ready": ...}`, then for every job `{"files": [[name, size], ...], "run":
"pytest"|"python", "args", "limits", "test_file", "solution"}` with the files' bytes as payload, it
answers one result header with the job's output and pytest's report as payload.
"""

import contextlib
import ctypes
import gc
import json
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
import traceback
import types

_PR_SET_DUMPABLE = 4
_MAX_RESULT_BYTES = 1 << 20
_MB = 1 << 20
_FRAME = struct.Struct(">II")
_CHUNK = bytearray(1 << 16)  # every read of job output goes through here, zeroed after each job
_REPORT = bytearray(_MAX_RESULT_BYTES)


def main() -> None:
    config = json.loads(sys.argv[1])
    isolation = _load_module("honed_isolation", config["isolation"]) if config.get("isolation") else None
    work, contained = config["work"], bool(config["contained"])
    scratch = [work, *config["scratch"]]  # emptied after every job
    # A fork bomb's leftovers are killed with kill(-1): only ever inside a fresh pid namespace,
    # where the zygote is one of the first pids. Outside one, kill(-1) would hit the whole host.
    contained = contained and os.getpid() <= 3
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    _set_dumpable(False)  # jobs run as our uid: they must not ptrace us
    _preload()
    gc.collect()
    gc.freeze()  # forked jobs then do not copy the preloaded heap just to scan it
    _send(proto_out, {"ready": True, "pid": os.getpid(), "uid": os.getuid(), "contained": contained})
    n = 0
    while True:
        # The next job's solution process, forked before the job is read: none of it is in its memory.
        spare = _Spare(isolation) if isolation is not None else None
        frame = _receive(proto_in)
        if frame is None:
            if spare is not None:
                spare.discard(contained)
            return
        header, payload = frame
        n += 1
        blobs: list = []
        try:
            result, blobs = _run_job(header, payload, n, work, contained, spare)
        except Exception:
            result = {"sandbox_error": traceback.format_exc()[-4000:]}
        finally:
            _zero(payload)
            if spare is not None:
                spare.discard(contained)
        _send(proto_out, result, blobs)
        for blob in blobs:
            _zero(blob)
            blob.release()
        for buffer in (_CHUNK, _REPORT):
            _zero(buffer)
        _clean(scratch)  # before reading the next job
        if contained:  # in the sandbox's own IPC namespace only: outside it, these are the host's
            _remove_ipc()


def _load_module(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    return module


def _preload() -> None:
    import importlib
    import pkgutil
    import runpy  # noqa: F401

    import _pytest
    import pytest  # noqa: F401

    for module in pkgutil.walk_packages(_pytest.__path__, "_pytest."):
        with contextlib.suppress(Exception):
            importlib.import_module(module.name)


class _Spare:
    """A solution process waiting for its job: the agent's code runs in it, never in the tests process."""

    def __init__(self, isolation: types.ModuleType) -> None:
        ours, theirs = socket.socketpair()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child
            try:
                os.setsid()
                fd = theirs.detach()
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                os.dup2(fd, 3)
                os.closerange(4, 1 << 16)  # the zygote's protocol, the tests' end, ...
                _set_dumpable(True)
                isolation.serve(3, _apply_limits)
            finally:
                os._exit(70)
        theirs.close()
        os.close(out_w)
        os.close(err_w)
        self.sock, self.out, self.err = ours.detach(), out_r, err_r
        self.status: int | None = None
        self.cpu_s = 0.0
        self.rss_kb = 0
        self.open = True

    def fds(self) -> tuple[int, int, int]:
        return self.sock, self.out, self.err

    def close_fds(self) -> None:
        if self.open:
            self.open = False
            for fd in self.fds():
                os.close(fd)

    def reap(self, block: bool) -> None:
        if self.status is not None:
            return
        with contextlib.suppress(ChildProcessError):
            pid, status, usage = os.wait4(self.pid, 0 if block else os.WNOHANG)
            if pid:
                self.status, self.cpu_s, self.rss_kb = (
                    status,
                    usage.ru_utime + usage.ru_stime,
                    usage.ru_maxrss,
                )

    def discard(self, contained: bool) -> None:
        self.close_fds()
        if self.status is None:
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
        self.reap(block=True)


def _run_job(
    header: dict, payload: bytearray, n: int, work: str, contained: bool, spare: "_Spare | None"
) -> tuple:
    limits = header["limits"]
    solution = header.get("solution")
    isolated = spare is not None and header["run"] == "pytest" and bool(solution)
    if not isolated and spare is not None:
        spare.discard(contained)  # no untrusted process may watch a job it has no part in
    jobdir = os.path.join(work, f"job{n}")
    os.mkdir(jobdir, 0o700)
    soldir = jobdir + "-solution"
    if isolated:
        os.mkdir(soldir, 0o700)
    _write_files(header, payload, jobdir, soldir if isolated else None)
    _zero(payload)
    out_r, out_w = os.pipe()
    result_r, result_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(out_r)
        os.close(result_r)
        _child(header, jobdir, out_w, result_w, spare if isolated else None, soldir)
    os.close(out_w)
    os.close(result_w)
    if isolated:
        spare.close_fds()  # the tests process holds them now
    output = _Ring(int(limits["output_kb"]) * 1024)
    report = _Fill(_REPORT)
    try:
        timed_out = _watch(pid, out_r, output, result_r, report, start + float(limits["wall_s"]))
        # Outside a pid namespace the group must die while the unreaped child still holds its id.
        if timed_out or not contained:
            _kill_leftovers(pid, contained)
        _, status, usage = os.wait4(pid, 0)
        if isolated:
            spare.reap(block=False)  # how it ended on its own, before anyone killed it
        if contained:
            _kill_leftovers(pid, contained)  # whatever it left running
        if isolated:
            spare.discard(contained)
        _drain(result_r, report)
        _drain(out_r, output)
    finally:
        os.close(result_r)
        os.close(out_r)
    result = {
        "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "timed_out": timed_out,
        "duration_s": time.monotonic() - start,
        "cpu_s": usage.ru_utime + usage.ru_stime + (spare.cpu_s if isolated else 0.0),
        "max_rss_kb": max(usage.ru_maxrss, spare.rss_kb if isolated else 0),
        "output_size": output.size(),
        "output_dropped": output.dropped(),
        "report_size": report.used,
    }
    if isolated and spare.status is not None:
        result["solution_exit_code"] = os.WEXITSTATUS(spare.status) if os.WIFEXITED(spare.status) else None
        result["solution_signal"] = os.WTERMSIG(spare.status) if os.WIFSIGNALED(spare.status) else None
        result["solution_cpu_s"] = spare.cpu_s
    return result, [*output.views(), memoryview(_REPORT)[: report.used]]


def _write_files(header: dict, payload: bytearray, jobdir: str, soldir: "str | None") -> None:
    """The files from the payload; with a solution directory, the agent's file goes only there and
    the test file only to the tests' directory (the rest to both)."""
    view, offset = memoryview(payload), 0
    try:
        for name, size in header["files"]:
            if not isinstance(name, str) or os.sep in name or name.startswith(".") or not name:
                raise ValueError(f"bad file name {name!r}")
            chunk = view[offset : offset + int(size)]
            offset += int(size)
            if soldir is None:
                targets = [jobdir]
            elif name == header.get("solution"):
                targets = [soldir]
            elif name == header.get("test_file"):
                targets = [jobdir]
            else:
                targets = [jobdir, soldir]
            for directory in targets:
                fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    written = 0
                    while written < len(chunk):
                        written += os.write(fd, chunk[written:])
                finally:
                    os.close(fd)
            chunk.release()
    finally:
        view.release()


def _child(
    header: dict, jobdir: str, out_fd: int, result_fd: int, spare: "_Spare | None", soldir: str
) -> None:
    code = 70
    try:
        os.setsid()
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        _close_fds_except({result_fd, *(spare.fds() if spare else ())})
        if spare is None:
            _set_dumpable(True)
        # else: the tests process stays non-dumpable: the solution process runs as our uid, and must
        # not ptrace us or open /proc/<pid>/fd/<the result pipe>.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        _apply_limits(header["limits"])
        os.chdir(jobdir)
        sys.dont_write_bytecode = True
        if header["run"] == "pytest":
            args = list(header["args"])
            if spare is not None:
                args = _isolate(header, jobdir, soldir, spare) + args
            code = _run_pytest(args, result_fd)
        else:
            code = _run_python(header["args"], jobdir)
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


def _isolate(header: dict, jobdir: str, soldir: str, spare: "_Spare") -> list:
    """Put the solution module behind proxies; the pytest options that keep the tests process
    trusted: no conftest files, no job directory on sys.path (the solution can write there)."""
    isolation = sys.modules["honed_isolation"]
    module = header["solution"].removesuffix(".py")
    test_path = os.path.join(jobdir, header["test_file"])

    def hide_tests() -> None:  # right before agent code first runs: it never sees the test file
        isolation.keep_source(test_path)
        with contextlib.suppress(OSError):
            os.unlink(test_path)

    sys.path[:] = [p for p in sys.path if p not in ("", ".", jobdir)]
    isolation.install(
        spare.sock,
        (spare.out, spare.err),
        module=module,
        start={"dir": soldir, "limits": header["limits"]},
        before_import=hide_tests,
    )
    return ["--noconftest", "--import-mode=importlib"]


def _close_fds_except(keep: set) -> None:
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 1 << 16)


class _Report:
    """A pytest plugin recording each test's outcome, so the verdict does not depend on terminal text."""

    def __init__(self) -> None:
        self.tests = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "xfailed": 0, "xpassed": 0}
        self.outcomes: dict = {}  # node id -> passed, failed, error, skipped, xfailed, xpassed
        self.failures: list[dict] = []

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.tests["errors"] += 1
            self.outcomes[report.nodeid or "collection"] = "error"
            self._keep(report.nodeid or "collection", report)

    def pytest_runtest_logreport(self, report) -> None:
        xfail = hasattr(report, "wasxfail")
        if report.when == "call":
            if report.passed:
                key = "xpassed" if xfail else "passed"
            elif report.failed:
                key = "failed"
            else:
                key = "xfailed" if xfail else "skipped"
            self.tests[key] += 1
            self.outcomes[report.nodeid] = key
            if report.failed:
                self._keep(report.nodeid, report)
        elif report.failed:
            self.tests["errors"] += 1
            self.outcomes[report.nodeid] = "error"
            self._keep(f"{report.nodeid} ({report.when})", report)
        elif report.skipped and report.when == "setup":
            key = "xfailed" if xfail else "skipped"
            self.tests[key] += 1
            self.outcomes[report.nodeid] = key

    def _keep(self, test: str, report) -> None:
        if len(self.failures) < 10:
            self.failures.append({"test": test, "message": str(report.longrepr)[-4000:]})


def _run_pytest(args: list, result_fd: int) -> int:
    import pytest

    report = _Report()
    rc = int(pytest.main(list(args), plugins=[report]))
    summary = {"rc": rc, "tests": report.tests, "outcomes": report.outcomes, "failures": report.failures}
    isolation = sys.modules.get("honed_isolation")
    session = getattr(isolation, "_SESSION", None)
    if session is not None and session.channel.broken:
        summary["solution_gone"] = session.channel.broken  # why the solution stopped answering
    data = json.dumps(summary).encode()
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


def _watch(pid: int, out_fd: int, output: "_Ring", result_fd: int, report: "_Fill", deadline: float) -> bool:
    """Wait for the child to exit or the deadline (True), reading its output and report meanwhile
    (a full pipe would otherwise block it)."""
    pidfd = os.pidfd_open(pid)
    open_fds = {out_fd, result_fd}
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            ready, _, _ = select.select([pidfd, *open_fds], [], [], remaining)
            for fd in ready:
                if fd != pidfd and not (output if fd == out_fd else report).read(fd):
                    open_fds.discard(fd)
            if pidfd in ready:
                return False
    finally:
        os.close(pidfd)


class _Ring:
    """The last `limit` bytes of a stream in a buffer allocated once (zeroed when the job ends)."""

    def __init__(self, limit: int) -> None:
        self.buffer = bytearray(max(1, limit))
        self.total = 0

    def read(self, fd: int) -> bool:
        try:
            n = os.readv(fd, [_CHUNK])
        except BlockingIOError:
            return True
        if n <= 0:
            return False
        size, chunk = len(self.buffer), memoryview(_CHUNK)[:n]
        if n >= size:
            self.buffer[:] = chunk[n - size :]
            self.total += n
            chunk.release()
            return True
        at = self.total % size
        first = min(n, size - at)
        self.buffer[at : at + first] = chunk[:first]
        self.buffer[: n - first] = chunk[first:]
        self.total += n
        chunk.release()
        return True

    def size(self) -> int:
        return min(self.total, len(self.buffer))

    def dropped(self) -> int:
        return max(0, self.total - len(self.buffer))

    def views(self) -> list:
        view = memoryview(self.buffer)
        if self.total <= len(self.buffer):
            return [view[: self.total]]
        at = self.total % len(self.buffer)
        return [view[at:], view[:at]]


class _Fill:
    """Up to `len(buffer)` bytes of a stream, read straight into `buffer`; the rest is dropped."""

    def __init__(self, buffer: bytearray) -> None:
        self.buffer, self.used = buffer, 0

    def read(self, fd: int) -> bool:
        try:
            if self.used < len(self.buffer):
                with memoryview(self.buffer) as view:
                    n = os.readv(fd, [view[self.used :]])
                self.used += max(0, n)
            else:
                n = os.readv(fd, [_CHUNK])
        except BlockingIOError:
            return True
        return n > 0


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


def _drain(fd: int, sink) -> None:
    os.set_blocking(fd, False)
    for _ in range(32):
        if not sink.read(fd):
            break
    with contextlib.suppress(OSError):
        os.set_blocking(fd, True)


def _zero(buffer) -> None:
    if buffer is not None and len(buffer):
        buffer[:] = bytes(len(buffer))


def _clean(roots: list) -> None:
    """Empty the writable places (job dirs, temp dirs, shared memory): nothing survives a job."""
    for root in roots:
        for entry in _listdir(root):
            path = os.path.join(root, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                _remove_tree(path)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)


def _remove_tree(top: str) -> None:
    """Remove a directory tree a job left, without recursion and by relative names: a tree
    thousands of levels deep raised RecursionError in `shutil.rmtree`, which ended this process
    after the job had been answered, and the next job sent here (another run's) got an error
    verdict; its paths are past PATH_MAX too. Directories a job made unreadable are opened up
    first; what cannot be removed is left."""
    home = os.open(".", os.O_RDONLY)
    names: list[str] = []  # the directories entered below `top`, outermost first
    try:
        with contextlib.suppress(OSError):
            os.chmod(top, 0o700)
        os.chdir(top)
        pending = [_empty_here()]  # per level entered: its subdirectories not yet entered
        while pending:
            if pending[-1]:
                sub = pending[-1].pop()
                with contextlib.suppress(OSError):
                    os.chmod(sub, 0o700)
                try:
                    os.chdir(sub)
                except OSError:
                    continue
                names.append(sub)
                pending.append(_empty_here())
                continue
            pending.pop()
            if names:
                os.chdir("..")
                with contextlib.suppress(OSError):
                    os.rmdir(names.pop())
    except OSError:
        pass
    finally:
        os.fchdir(home)
        os.close(home)
    with contextlib.suppress(OSError):
        os.rmdir(top)


def _empty_here() -> list[str]:
    """Unlink the working directory's files and links; the names of its subdirectories."""
    subdirs = []
    with contextlib.suppress(OSError), os.scandir(".") as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.name)
    return subdirs


def _remove_ipc() -> None:
    """Remove the SysV shared memory, message queues and semaphores a job left: they outlive its
    processes (a segment detached is still there, holding memory outside the job's rlimits) and
    would reach the next job, another trajectory's. The sandbox has an IPC namespace of its own:
    everything listed here is a job's."""
    libc = ctypes.CDLL(None, use_errno=True)
    for kind, remove in (
        ("shm", lambda i: libc.shmctl(i, 0, None)),  # IPC_RMID is 0
        ("msg", lambda i: libc.msgctl(i, 0, None)),
        ("sem", lambda i: libc.semctl(i, 0, 0)),
    ):
        try:
            with open(f"/proc/sysvipc/{kind}") as listing:
                rows = listing.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 1 and fields[1].isdigit():
                remove(int(fields[1]))


def _listdir(path: str) -> list:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _set_dumpable(value: bool) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, int(value), 0, 0, 0)


def _send(fd: int, message: dict, blobs: "list | tuple" = ()) -> None:
    header = json.dumps(message).encode()
    size = sum(len(b) for b in blobs)
    for piece in (_FRAME.pack(len(header), size) + header, *blobs):
        view = memoryview(piece)
        while view:
            view = view[os.write(fd, view) :]
        view.release()


def _receive(fd: int) -> "tuple[dict, bytearray] | None":
    """One frame from the parent, or None at the end; the payload in a buffer the caller zeroes."""
    head = _read_exact(fd, bytearray(_FRAME.size))
    if head is None:
        return None
    header_size, payload_size = _FRAME.unpack(head)
    header = _read_exact(fd, bytearray(header_size))
    payload = _read_exact(fd, bytearray(payload_size))
    if header is None or payload is None:
        return None
    return json.loads(bytes(header)), payload


def _read_exact(fd: int, buffer: bytearray) -> "bytearray | None":
    view, got = memoryview(buffer), 0
    try:
        while got < len(buffer):
            n = os.readv(fd, [view[got:]])
            if n <= 0:
                return None
            got += n
    finally:
        view.release()
    return buffer


def _set_dumpable(value: bool) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, int(value), 0, 0, 0)


if __name__ == "__main__":
    main()
