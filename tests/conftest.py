from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).parent))

PG_ADMIN_URL = os.environ.get("HONED_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own spool folder and default store, so nothing leaks between tests."""
    monkeypatch.setenv("HONED_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("HONED_STORE", f"sqlite:///{tmp_path / 'default.db'}")


@pytest.fixture(autouse=True)
def _recorders_closed() -> Iterator[None]:
    """The recorders a test made are closed at its end: each holds a store process (~60 MB) that
    otherwise lived until the whole run ended, and a full run held hundreds at once (a run beside
    other work was killed for memory, session 25)."""
    from honed.capture.recorder import live_recorders

    before = {id(r) for r in live_recorders()}
    yield
    for recorder in live_recorders():
        if id(recorder) not in before:
            recorder.close(timeout=5)


@pytest.fixture(params=["thread", "process"])
def writer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Where the store's inserts run (`HONED_WRITER`), for every recorder the test makes, in
    this process or in one it starts."""
    monkeypatch.setenv("HONED_WRITER", request.param)
    return request.param


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'honed.db'}"


def _pg_available() -> bool:
    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL schema on the machine's real server, dropped afterwards."""
    if not _pg_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}; .ci/run should have started it")
        pytest.skip("PostgreSQL is not running")
    schema = f"honed_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def capture_role(pg_url: str) -> Iterator[tuple[str, str]]:
    """(the owner's URL, the URL of a fresh LOGIN role with no rights yet: a test grants capture), dropped after."""
    from sqlalchemy.engine import make_url

    role = f"honed_agent_{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
    try:
        yield pg_url, make_url(pg_url).set(username=role).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP OWNED BY "{role}"'))
            conn.execute(text(f'DROP ROLE "{role}"'))
        admin.dispose()
