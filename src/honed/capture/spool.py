"""A local append-only file that holds trajectory records while the store is down.

JSON lines under an exclusive `flock`, so several processes capturing into the same store can
share one spool; replay is idempotent because the store skips ids it already has.
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

log = logging.getLogger("honed")


def default_spool_path(store_url: str) -> Path:
    """`$HONED_SPOOL_DIR` (default `~/.cache/honed/spool`) / one file per store URL."""
    folder = Path(os.environ.get("HONED_SPOOL_DIR") or Path.home() / ".cache" / "honed" / "spool")
    digest = hashlib.sha256(store_url.encode()).hexdigest()[:16]
    return folder.expanduser() / f"{digest}.jsonl"


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Append records durably (fsync): they are the only copy until the store is back."""
        if not records:
            return
        lines = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records)
        with self._locked("a") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())

    def pending(self) -> int:
        """How many records wait in the spool (0 when there is no file)."""
        try:
            with open(self.path, "rb") as handle:
                return sum(1 for line in handle if line.strip())
        except FileNotFoundError:
            return 0

    def has_pending(self) -> bool:
        try:
            return self.path.stat().st_size > 0
        except FileNotFoundError:
            return False

    def replay(self, save: Callable[[list[dict[str, Any]]], Any], batch: int = 500) -> int:
        """Hand every spooled record to `save`, oldest first, then empty the spool.

        If `save` raises, the spool is left as it was (records already saved are skipped by the
        store next time) and the exception propagates to the caller, which retries later.
        """
        if not self.has_pending():
            return 0
        with self._locked("r+") as handle:
            replayed = 0
            for chunk in _chunks(_read_records(handle, self.path), batch):
                save(chunk)
                replayed += len(chunk)
            handle.seek(0)
            handle.truncate()
            handle.flush()
            os.fsync(handle.fileno())
        return replayed

    @contextmanager
    def _locked(self, mode: str) -> Iterator[IO[str]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if mode == "r+" and not self.path.exists():
            self.path.touch()
        with open(self.path, mode, encoding="utf-8") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield handle
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _read_records(handle: IO[str], path: Path) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            # A torn last line (a crash mid-append) loses only itself; say so.
            log.error("honed: skipped an unreadable line %d of the spool %s", number, path)


def _chunks(items: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
