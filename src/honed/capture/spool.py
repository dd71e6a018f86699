"""A local append-only file that holds trajectory records while the store is down.

JSON lines under an exclusive `flock`, so several processes capturing into the same store can
share one spool; replay is idempotent because the store skips ids it already has. Beside each
spool, `<name>.url` names its store (password hidden), so `honed spool` can say what waits where.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from honed._json import scrubbed

log = logging.getLogger("honed")


def default_spool_path(store_url: str) -> Path:
    """`$HONED_SPOOL_DIR` (default `~/.cache/honed/spool`) / one file per store URL."""
    digest = hashlib.sha256(store_url.encode()).hexdigest()[:16]
    return spool_folder() / f"{digest}.jsonl"


def spools() -> list[Spool]:
    """Every spool file in the spool folder (`honed spool` lists them)."""
    folder = spool_folder()
    if not folder.is_dir():
        return []
    return [Spool(path) for path in sorted(folder.glob("*.jsonl"))]


def spool_folder() -> Path:
    return Path(os.environ.get("HONED_SPOOL_DIR") or Path.home() / ".cache" / "honed" / "spool").expanduser()


class Spool:
    def __init__(self, path: Path, store: str | None = None) -> None:
        self.path = Path(path)
        self.store = store  # the store it waits for (shown, password hidden)
        self._labelled = False
        self._unreadable_said = False

    @property
    def label_path(self) -> Path:
        return self.path.with_suffix(".url")

    def stored_label(self) -> str | None:
        """The store this spool waits for, as written beside it (None for an unlabelled spool)."""
        try:
            return self.label_path.read_text(encoding="utf-8").strip() or None
        except OSError:
            return None

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Append records durably (fsync): they are the only copy until the store is back."""
        if not records:
            return
        lines = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records)
        try:
            lines.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: the file (UTF-8) cannot hold it
            lines = "".join(
                json.dumps(scrubbed(r), ensure_ascii=False, separators=(",", ":")) + "\n" for r in records
            )
        with self._locked("a") as handle:
            if _ends_mid_line(self.path):  # a crash (or a full disk) cut the last append short:
                lines = "\n" + lines  # its torn line must not swallow this first record
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())
        if self.store and not self._labelled:
            self.label_path.write_text(self.store + "\n", encoding="utf-8")
            self._labelled = True

    def summary(self) -> dict[str, Any]:
        """What waits: how many records, the oldest and newest run start (epoch seconds)."""
        count, oldest, newest = 0, None, None
        try:
            with open(self.path, encoding="utf-8") as handle:
                for line in handle:
                    if not line.strip():
                        continue
                    count += 1
                    try:
                        started = json.loads(line).get("started_at")
                    except (json.JSONDecodeError, AttributeError):
                        continue
                    if isinstance(started, int | float):
                        oldest = started if oldest is None else min(oldest, started)
                        newest = started if newest is None else max(newest, started)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            pass
        return {
            "path": str(self.path),
            "store": self.store or self.stored_label(),
            "pending": count,
            "oldest": oldest,
            "newest": newest,
        }

    def pending(self) -> int:
        """How many records wait in the spool (0 when there is no file)."""
        try:
            with open(self.path, "rb") as handle:
                return sum(1 for line in handle if line.strip())
        except (FileNotFoundError, NotADirectoryError, PermissionError):  # nothing readable waits there
            return 0

    def has_pending(self) -> bool:
        try:
            return self.path.stat().st_size > 0
        except FileNotFoundError:
            return False
        except OSError as exc:  # a folder that cannot be read (a file in its path, no permission):
            # nothing can be waiting there, and capture into a working store must go on (a QA pass,
            # session 20: `instrument()` raised, and Middleware stored nothing)
            if not self._unreadable_said:
                self._unreadable_said = True
                log.warning("honed: cannot read the spool at %s (%s)", self.path, exc)
            return False

    def replay(self, save: Callable[[list[dict[str, Any]]], Any], batch: int = 500) -> int:
        """Hand every spooled record to `save`, oldest first, then empty the spool; returns how
        many were written (what `save` says it wrote, when it says: `save_records` skips those
        already stored, which a replay of a spool replayed before counted again).

        If `save` raises, the spool is left as it was (records already saved are skipped by the
        store next time) and the exception propagates to the caller, which retries later.
        """
        if not self.has_pending():
            return 0
        with self._locked("r+") as handle:
            replayed = 0
            for chunk in _chunks(_read_records(handle, self.path), batch):
                written = save(chunk)
                replayed += written if isinstance(written, int) else len(chunk)
            handle.seek(0)
            handle.truncate()
            handle.flush()
            os.fsync(handle.fileno())
        return replayed

    @contextmanager
    def _locked(self, mode: str) -> Iterator[IO[str]]:
        # Captured conversations, for this user only: made 0644 under a 022 umask, any account on
        # the host read them (a QA pass, session 27). A folder that exists keeps its mode.
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        with open(self.path, mode, encoding="utf-8") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield handle
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _ends_mid_line(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"
    except OSError:  # empty or missing: nothing to finish
        return False


class NotASpool(ValueError):
    """The file given to replay holds something other than spooled trajectories: left untouched."""


def _read_records(handle: IO[str], path: Path) -> Iterator[dict[str, Any]]:
    """The spooled records; raises `NotASpool` (before the file is emptied) at a line that parses
    but is not one, or when no line is (`honed spool --replay --from` a text file emptied it)."""
    records = torn = 0
    for number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # A torn last line (a crash mid-append) loses only itself; say so.
            log.error("honed: skipped an unreadable line %d of the spool %s", number, path)
            torn += 1
            continue
        if not (
            isinstance(record, dict)
            and isinstance(record.get("id"), str)
            and "started_at" in record
            and isinstance(record.get("steps", ()), list | None)  # `honed runs --json` has n_steps
            and "steps" in record
        ):
            raise NotASpool(
                f"{path}, line {number}, is not a spooled trajectory: not a spool file (left as it was)"
            )
        records += 1
        yield record
    if torn and not records:
        raise NotASpool(
            f"{path} holds no spooled trajectory, only unreadable lines: not a spool file (left as it was)"
        )


def _chunks(items: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
