"""The store's writes in a process of their own, so that they do not hold the agent's GIL.

The writer thread assembles, serialises and redacts each batch in the agent's process; what
remains, the database insert (about half of the writer's CPU per step: SQLAlchemy, the driver,
SQLite itself), runs here in a child process that owns a `StoreSink` (store, then spool while the
store is down). The hand-off is one `pickle.dumps` per batch (about 3 us per step) and a pipe
write, done on the writer thread, never on the agent's.

    parent (writer thread)                       child (`store_process.main`)
    ProcessStoreSink.write(records) --pickle-->  StoreSink.write(records)  (store, or spool)
                        <--("ack", n, counts)--

`wait` (what `Recorder.flush` calls) returns once the child has acknowledged every batch sent, so
`flush()` still means "in the store (or the spool)". If the parent dies, even by kill -9, the child
reads end-of-file after the last batch it was sent, writes it and exits: what reached the pipe is
not lost. If the child dies or cannot start, the batches it had not acknowledged are written in
this process (`save_records` is idempotent, so a batch written twice is stored once) and this
sink goes on in-process, with a warning. The child is started with `subprocess`, not
`multiprocessing` (whose spawn re-imports the application's `__main__`), and is told the store URL
on its stdin, never on its command line (where `ps` shows it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
from typing import IO, Any

from honed.capture.sinks import Record, StoreSink

log = logging.getLogger("honed")

_FRAME = struct.Struct("<Q")
_CHUNK = 64  # trajectories per message
_PIPE_BYTES = 1 << 20  # Linux's default /proc/sys/fs/pipe-max-size
# At close, how long the child may take to finish what it was sent. Past it the store hangs (a
# stopped server, a network that drops packets): what it has not acknowledged goes to the spool
# from here and the child is stopped. Waiting longer made a process exit take a minute.
CLOSE_WAIT_S = 5.0
_forked_away: list[subprocess.Popen[bytes]] = []  # a forked copy's view of its parent's children


def _send(out: IO[bytes], message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(_FRAME.pack(len(data)) + data)
    out.flush()


def _widen(pipe: IO[bytes]) -> None:
    """Give the pipe to the child room for several batches (Linux's default is 64 KiB, less than
    one batch of 64 runs): the writer hands a batch over and goes on while the child is still
    inserting the previous one, instead of waiting for it (ingest +10-15%, benchmarks/README.md).
    Best effort: elsewhere, or past the system's limit, the pipe keeps its size."""
    try:
        import fcntl

        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    except (ImportError, AttributeError, OSError):
        pass


def _receive(source: IO[bytes]) -> Any:
    """The next message, or None at end of file."""
    header = source.read(_FRAME.size)
    if len(header) < _FRAME.size:
        return None
    (size,) = _FRAME.unpack(header)
    data = source.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


class ProcessStoreSink:
    """`inner`, a `StoreSink`, run in a child process (see the module docstring); `inner` itself
    writes here if the child cannot. The same `spool` and `stats()`."""

    def __init__(self, inner: StoreSink) -> None:
        self.inner = inner
        self.store_url = inner.store_url
        self.spool = inner.spool
        self._local = False  # True once the child failed: `inner` writes, in this process
        self._child: subprocess.Popen[bytes] | None = None
        self._unacked: dict[int, list[Record]] = {}
        self._sent_at: dict[int, float] = {}  # when each unacknowledged batch was handed over
        self._sent = 0
        self._counts: dict[str, Any] = {}
        self._changed = threading.Condition()
        self._alive = False
        self._writing = 0  # writes to the child in progress (the writer thread's)
        self._spool_only = False  # closing past a store that hangs: the rest goes to the spool
        self._fds: tuple[int, ...] = ()

    def forget_child(self) -> None:
        """In a forked copy of the process: the child is the parent's. Its copy of the pipe is
        closed, or the child would never read end of file when the parent closes its own."""
        child = self._child
        if child is not None:
            # By descriptor: the parent's reader thread may have held the pipe objects' locks at
            # the fork, and here no thread will release them. The objects are kept, never closed,
            # so that their descriptor numbers, reused by now, are not closed a second time.
            _forked_away.append(child)
            for fd in self._fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._child, self._alive, self._unacked, self._sent, self._writing = None, False, {}, 0, 0
        self._changed = threading.Condition()

    # -- the Sink interface ------------------------------------------------------------------

    def write(self, records: list[Record]) -> None:
        if self._spool_only:
            self.inner.to_spool(records)
            return
        if not self._local and self._child is None:
            self._start()
        if self._local:
            self.inner.write(records)
            return
        for start in range(0, len(records), _CHUNK):  # the child holds one chunk at a time
            chunk = records[start : start + _CHUNK]
            with self._changed:
                self._sent += 1
                self._unacked[self._sent] = chunk
                self._sent_at[self._sent] = time.time()
                n = self._sent
            self._post(("write", n, chunk))

    def idle(self) -> None:
        if not self._local and self._child is None and self.spool.has_pending():
            self._start()  # an earlier run's spool: the child replays it
        if self._local:
            self.inner.idle()
        elif self._child is not None:
            self._post(("idle", 0, None))  # the child retries its spool when due

    def retry_now(self) -> None:
        """The store's `retry_now`, where it runs; acknowledged as a write is, so `wait` waits for it."""
        if self._local:
            self.inner.retry_now()
        elif self._child is not None:
            with self._changed:
                self._sent += 1
                self._unacked[self._sent] = []
                self._sent_at[self._sent] = time.time()
                n = self._sent
            self._post(("retry", n, None))

    def wait(self, timeout: float | None = None) -> bool:
        """Until the child has acknowledged every batch sent (or they were written here)."""
        with self._changed:
            done = self._changed.wait_for(lambda: not self._unacked or not self._alive, timeout)
        if self._unacked and not self._alive:
            self._take_over("the store's process ended")
            return True
        return done

    def pending_since(self) -> float | None:
        """When the oldest batch the child has not acknowledged was handed to it (epoch seconds):
        what waits there is not in the store yet (`Recorder.lag_s` counts it)."""
        with self._changed:
            return min(self._sent_at.values(), default=None)

    def stats(self) -> dict[str, Any]:
        with self._changed:
            counts = dict(self._counts)
        local = self.inner.stats()  # its counts (what it wrote itself) and the spool's size
        for key, value in local.items():
            if isinstance(value, int) and not isinstance(value, bool):
                counts[key] = counts.get(key, 0) + value
            elif self._local or key not in counts:
                counts[key] = value
        return counts

    def close(self) -> None:
        child = self._child
        if child is not None and child.stdin is not None:
            # A write blocked in a full pipe (the child waits on a store that hangs) holds the
            # pipe's lock: closing it here waited for ever, through SIGTERM (a QA pass, session
            # 20). Wait for the write a while; past that, the kill below ends it (a broken pipe).
            writes_done = time.monotonic() + CLOSE_WAIT_S
            while self._writing and time.monotonic() < writes_done:
                time.sleep(0.01)
            if not self._writing:
                with contextlib.suppress(OSError, ValueError):
                    child.stdin.close()  # end of file: the child writes what it has and exits
            try:
                child.wait(timeout=CLOSE_WAIT_S if not self._writing else 0)
            except subprocess.TimeoutExpired:
                with self._changed:
                    pending = [self._unacked.pop(n) for n in sorted(self._unacked)]
                    self._sent_at.clear()
                log.warning(
                    "honed: the store %s did not answer within %.0f s; %d unwritten trajectories go to the spool %s",
                    self.inner.safe_url(), CLOSE_WAIT_S, sum(len(r) for r in pending), self.spool.path,
                )  # fmt: skip
                self._spool_only = True  # what the writer hands over from now on, too
                for records in pending:  # not written again to the store that hangs
                    self.inner.to_spool(records)
                child.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=5)
                with contextlib.suppress(OSError, ValueError):
                    child.stdin.close()  # the blocked write has failed on the broken pipe by now
        self.wait(timeout=5)
        self.inner.close()

    # -- the child ---------------------------------------------------------------------------

    def _start(self) -> None:
        try:
            child = subprocess.Popen(
                [sys.executable, "-c", "from honed.capture.store_process import main; main()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                # Not in the application's process group: a Ctrl-C there must not kill what
                # still has batches to write (it stops at end of file, when the parent is gone).
                start_new_session=True,
                close_fds=True,
            )
            assert child.stdin is not None and child.stdout is not None
            _widen(child.stdin)
            _send(child.stdin, {"store": self.store_url, "spool": str(self.spool.path)})
            ready = _receive(child.stdout)
            if not (isinstance(ready, tuple) and ready[0] == "ready"):
                raise RuntimeError(f"it answered {ready!r}")
        except Exception as exc:
            log.warning("honed: the store's process could not start (%s); writing in this process", exc)
            self._local = True
            return
        self._child, self._alive = child, True
        self._fds = (child.stdin.fileno(), child.stdout.fileno())
        self._counts = ready[2]
        threading.Thread(target=self._read_acks, name="honed-store-acks", daemon=True).start()

    def _post(self, message: tuple[Any, ...]) -> None:
        child = self._child
        if child is None or child.stdin is None or not self._alive:
            self._take_over("the store's process ended")
            return
        self._writing += 1  # `close` must not take the pipe's lock from a write blocked in it
        try:
            _send(child.stdin, message)
        except (OSError, ValueError) as exc:  # a broken pipe: the child died
            with self._changed:
                self._alive = False
            self._take_over(f"the store's process ended ({exc})")
        finally:
            self._writing -= 1

    def _read_acks(self) -> None:
        child = self._child
        assert child is not None and child.stdout is not None
        try:
            while (message := _receive(child.stdout)) is not None:
                kind, n, counts = message
                if kind == "log":  # the child's warning, through this process's logging
                    log.log(n, "%s", counts)
                    continue
                with self._changed:
                    if kind == "ack":
                        self._unacked.pop(n, None)
                        self._sent_at.pop(n, None)
                    self._counts = counts
                    self._changed.notify_all()
        except Exception:  # a torn frame: the child died mid-write
            log.debug("honed: the store's process stopped answering", exc_info=True)
        with self._changed:
            self._alive = False
            self._changed.notify_all()

    def _take_over(self, why: str) -> None:
        """Write what the child never acknowledged here, and go on here."""
        with self._changed:
            pending = [self._unacked.pop(n) for n in sorted(self._unacked)]
            self._sent_at.clear()
        if self._spool_only:  # closing: not written to the store that hangs
            for records in pending:
                self.inner.to_spool(records)
            return
        if not self._local:
            log.warning("honed: %s; the store is written from this process from now on", why)
            self._local = True
        for records in pending:
            self.inner.write(records)


def main() -> None:
    """The child: read the store URL, then batches, until end of file."""
    source = sys.stdin.buffer
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print must not corrupt the frames
    config = _receive(source)
    if not isinstance(config, dict):
        return
    forward = _Forward(out)
    log.addHandler(forward)  # the application's logging sees the store's warnings, not our stderr
    log.propagate = False
    sink = StoreSink(config["store"], config["spool"])
    try:
        _send(out, ("ready", 0, sink.counts()))
        while (message := _receive(source)) is not None:
            kind, n, records = message
            if kind == "write":
                sink.write(records)
            elif kind == "retry":
                sink.retry_now()
            else:
                sink.idle()
            forward.send(("ack" if kind in ("write", "retry") else "idle", n, sink.counts()))
    except BrokenPipeError:  # the capturing process is gone (killed, or `os._exit`): nothing to say
        pass
    finally:
        sink.close()


class _Forward(logging.Handler):
    """The child's log records and acknowledgements, to the parent while it listens; once it is
    gone (a broken pipe), the batches it sent are still written, and the records go to stderr."""

    def __init__(self, out: IO[bytes]) -> None:
        super().__init__(logging.INFO)
        self.out: IO[bytes] | None = out

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        if not self.send(("log", record.levelno, text)):
            sys.stderr.write(text + "\n")

    def send(self, message: tuple[Any, ...]) -> bool:
        if self.out is None:
            return False
        try:
            _send(self.out, message)
            return True
        except OSError:
            self.out = None
            return False


if __name__ == "__main__":
    main()
