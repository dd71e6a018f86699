"""A real Arize Phoenix server on loopback, the OTLP backend the export tests and benchmark send to.

Started as a subprocess (`phoenix serve`) on free ports with its own working directory, ready when
`/healthz` answers; spans are read back through its REST API.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any


def phoenix_installed() -> bool:
    """Whether `arize-phoenix` is installed (found, not imported: importing it is slow)."""
    return (
        importlib.util.find_spec("phoenix") is not None and (Path(sys.executable).parent / "phoenix").exists()
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PhoenixServer:
    """`with PhoenixServer(tmp) as phoenix: ... phoenix.spans("project")`."""

    def __init__(
        self, workdir: Path, startup_timeout_s: float = 120.0, env: dict[str, str] | None = None
    ) -> None:
        self.workdir = Path(workdir)
        self.extra_env = dict(env or {})
        self.port = free_port()
        self.grpc_port = free_port()
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        """Base URL: the REST API, and OTLP/HTTP under `/v1/traces`."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_url(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    def __enter__(self) -> PhoenixServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PHOENIX_HOST": "127.0.0.1",
            "PHOENIX_PORT": str(self.port),
            "PHOENIX_GRPC_PORT": str(self.grpc_port),
            "PHOENIX_WORKING_DIR": str(self.workdir),
            "PHOENIX_TELEMETRY_ENABLED": "false",
            **self.extra_env,
        }
        for name in list(env):  # our own OTLP settings must not make Phoenix trace itself
            if name.startswith("OTEL_"):
                env.pop(name)
        log = open(self.workdir / "phoenix.log", "wb")  # noqa: SIM115 (the process owns it)
        phoenix_bin = Path(sys.executable).parent / "phoenix"
        self._process = subprocess.Popen(
            [str(phoenix_bin), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"phoenix exited at start; see {self.workdir / 'phoenix.log'}")
            try:
                with urllib.request.urlopen(f"{self.http_url}/healthz", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"phoenix did not answer /healthz in {self.startup_timeout_s:.0f} s")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
        self._process = None

    def spans(self, project: str, limit: int = 1000) -> list[dict[str, Any]]:
        """Every span of `project` (following the cursor), as Phoenix's REST API returns them."""
        found: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            query = {"limit": str(limit), **({"cursor": cursor} if cursor else {})}
            url = f"{self.http_url}/v1/projects/{urllib.parse.quote(project)}/spans?{urllib.parse.urlencode(query)}"
            try:
                with urllib.request.urlopen(url, timeout=30) as response:
                    page = json.load(response)
            except urllib.error.HTTPError as exc:
                if exc.code == 404:  # the project does not exist until its first span lands
                    return []
                raise
            found.extend(page["data"])
            cursor = page.get("next_cursor")
            if not cursor:
                return found

    def count(self, project: str) -> int:
        """How many spans `project` holds (one GraphQL query, cheap at any size)."""
        query = json.dumps({"query": "{ projects { edges { node { name recordCount } } } }"}).encode()
        request = urllib.request.Request(
            f"{self.http_url}/graphql", data=query, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            edges = json.load(response)["data"]["projects"]["edges"]
        return next((e["node"]["recordCount"] for e in edges if e["node"]["name"] == project), 0)

    def wait_for_spans(self, project: str, count: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """The project's spans once at least `count` have landed (ingestion is asynchronous)."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.spans(project)
            if len(spans) >= count or time.monotonic() > deadline:
                return spans
            time.sleep(0.3)
