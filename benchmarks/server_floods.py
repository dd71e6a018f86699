"""What one hostile client costs everyone else: honest requests' latency while it floods `honed serve`.

    .venv/bin/python benchmarks/server_floods.py [--seconds 10] [--connections 8] [--attacks none,long-prompts]

Starts `honed serve` on a tiny model built offline (no capture, an API key), then, for each attack,
runs it from 127.0.0.3 on `--connections` connections for `--seconds` while an honest client on
127.0.0.2 sends small chat completions (`max_tokens=8`) one after another, and prints the honest
requests' median and worst latency beside the same client's on an idle server:

- `none`: no attack (the baseline);
- `plain`: `GET /health` requests back to back on keep-alive connections;
- `header-lines`: the same requests with 6,000 `a:b` header lines each (30 KB, under the 64 KiB
  header cap): h11 parsed each line in Python on the event loop (16 connections: 7-16 s a request
  before the line count, session 22);
- `body-chunks`: a chunked body in 1-byte chunks, as fast as the connection takes it (8
  connections: 37 s before the chunk count, session 22);
- `chunks-256`: the same in 256-byte chunks (past the average the chunk count asks for);
- `trailer-lines`, `pipelined-lines`: 12,000 header lines as a chunked body's trailers, or behind
  another request in the same write (h11 parses them before they can be counted: refused after);
- `long-prompts`: valid completions of ~1,950-token prompts (just inside the window) with `n=16` and
  `max_tokens=1`, pipelined: the batch stays empty, and a group of them was prefilled whole while
  every other request waited (honest replies 1-6 s, a QA pass, session 28).

A figure, not a test (the machine is shared): the tests check the refusals themselves
(`tests/test_serve_hardening.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

KEY = "sk-bench-floods-0123456789"


def start_server(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    import honed
    from honed.demo import build_tiny

    model = build_tiny(root / "tiny", seed=1)
    store_url = f"sqlite:///{root / 'serve.db'}"
    with honed.open_store(store_url) as store:
        store.register_model("noise", model)
        store.promote("noise@v1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "HONED_API_KEY": KEY, "HONED_SPOOL_DIR": str(root / "spool")}
    command = [sys.executable, "-m", "honed.cli", "serve", "noise", "--store", store_url]
    command += ["--port", str(port), "--max-tokens", "8", "--no-capture"]
    log = (root / "server.log").open("wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit((root / "server.log").read_text()[-3000:])
        time.sleep(0.2)


def attacker(port: int, send: Callable[[socket.socket], None], stop: threading.Event) -> None:
    """One connection after another from 127.0.0.3, each fed by `send` until refused or stopped."""
    while not stop.is_set():
        try:
            with socket.create_connection(
                ("127.0.0.1", port), timeout=5, source_address=("127.0.0.3", 0)
            ) as sock:
                reader = threading.Thread(target=_drain, args=(sock, stop), daemon=True)
                reader.start()
                while not stop.is_set():
                    send(sock)
        except OSError:
            time.sleep(0.01)


def _drain(sock: socket.socket, stop: threading.Event) -> None:
    with contextlib.suppress(OSError):
        while not stop.is_set() and sock.recv(65536):
            pass


def plain(sock: socket.socket) -> None:
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 20)


def header_lines(sock: socket.socket) -> None:
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"a:b\r\n" * 6000 + b"\r\n")


def body_chunks(sock: socket.socket) -> None:
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    )
    for _ in range(1000):
        sock.sendall(b"1\r\n \r\n" * 256)


def chunks_256(sock: socket.socket) -> None:
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    )
    for _ in range(80):
        sock.sendall((b"100\r\n" + b" " * 256 + b"\r\n") * 64)


def trailer_lines(sock: socket.socket) -> None:
    sock.sendall(
        b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
        + b"a:b\r\n" * 12000
        + b"\r\n"
    )


def pipelined_lines(sock: socket.socket) -> None:
    sock.sendall(
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n"
        + b"a:b\r\n" * 12000
        + b"\r\n"
    )


_LONG = json.dumps(
    {
        "model": "noise",
        "messages": [{"role": "user", "content": " ".join(f"w{i % 97}" for i in range(500))}],
        "n": 16,
        "max_tokens": 1,
    }
).encode()


def long_prompts(sock: socket.socket) -> None:
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(_LONG)}\r\n\r\n".encode()
        + _LONG
    )


ATTACKS: dict[str, Callable[[socket.socket], None] | None] = {
    "none": None,
    "plain": plain,
    "header-lines": header_lines,
    "body-chunks": body_chunks,
    "chunks-256": chunks_256,
    "trailer-lines": trailer_lines,
    "pipelined-lines": pipelined_lines,
    "long-prompts": long_prompts,
}


def honest(url: str, seconds: float) -> list[float]:
    """Small completions one after another from 127.0.0.2 for `seconds`: each one's latency."""
    body = {"model": "noise", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
    took: list[float] = []
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(transport=transport, timeout=120) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.monotonic()
            reply = client.post(
                f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
            )
            took.append(time.monotonic() - started if reply.status_code == 200 else float("inf"))
            time.sleep(0.2)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="Which, comma-separated.")
    args = parser.parse_args()
    chosen = {name: ATTACKS[name] for name in args.attacks.split(",")}
    with tempfile.TemporaryDirectory(prefix="honed-floods-") as tmp:
        process, url = start_server(Path(tmp))
        port = int(url.rsplit(":", 1)[1])
        rows = {}
        try:
            for name, send in chosen.items():
                stop = threading.Event()
                threads = [
                    threading.Thread(target=attacker, args=(port, send, stop), daemon=True)
                    for _ in range(args.connections if send else 0)
                ]
                for t in threads:
                    t.start()
                time.sleep(1.0 if send else 0)  # the attack under way
                took = honest(url, args.seconds)
                stop.set()
                for t in threads:
                    t.join(timeout=10)
                rows[name] = {
                    "requests": len(took),
                    "median_s": round(statistics.median(took), 3),
                    "worst_s": round(max(took), 3),
                }
                time.sleep(1.0)  # the server settles
        finally:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(30)
    print(f"honest chat completions (max_tokens=8) while one client floods on {args.connections} connections")
    print(f"{'attack':<14} {'requests':>8} {'median s':>9} {'worst s':>8}")
    for name, row in rows.items():
        print(f"{name:<14} {row['requests']:>8} {row['median_s']:>9} {row['worst_s']:>8}")
    print(json.dumps({"connections": args.connections, "seconds": args.seconds, **rows}))


if __name__ == "__main__":
    main()
