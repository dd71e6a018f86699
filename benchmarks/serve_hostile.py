"""`honed serve` under hostile traffic: do good requests still succeed, as fast, and does memory come back?

    .venv/bin/python benchmarks/serve_hostile.py [--good 200] [--seconds 300] [--no-capture]

Starts the real server (`honed serve`, the CLI, in a subprocess) on 127.0.0.1 over the tiny model
(`build_tiny`, random weights) in a temporary folder, then:

1. baseline: `--good` concurrent good requests (16 tokens at T=1, each its own prompt);
2. hostile: the same good requests again, sent while hostile clients run alongside: a client's
   own chat template (a nested Jinja loop), sampling parameters that used to fail whole batches
   (`top_p=-1`, `temperature=1e-45`, negative or NaN temperature, `max_tokens=1e400`), malformed
   tool calls, deep nesting, 6 MB messages, a declared 1 GB body, a chunked body past the limit,
   connections trickling their headers or their body a byte at a time (slowloris), and idle
   connections;
3. after: the good requests once more, on their own.

Prints, per phase, how many good requests succeeded and their latency (p50, p99), what the
hostile clients got back (status counts; how long slow connections were held), and the server's
RSS at start (after a warm-up request) and at the end. Targets: every good request succeeds; p99
under attack within 2x of the baseline; RSS at the end within 20% of the start. Measures, asserts
nothing; bounded in count and in time (`--seconds`), and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

KEY = "sk-hostile-bench"
HOST = "127.0.0.1"
MAX_BODY_MB = 8
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
SLOW_TEMPLATE = "{% for i in range(20000) %}{% for j in range(20000) %}{% endfor %}{% endfor %}"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(root: Path, capture: bool) -> tuple[subprocess.Popen[bytes], int]:
    import honed
    from honed.demo import build_tiny

    store_url = f"sqlite:///{root / 'bench.db'}"
    with honed.open_store(store_url) as store:
        store.register_model("tiny", build_tiny(root / "tiny", seed=0))
        store.promote("tiny@v1")
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "honed.cli", "serve", "tiny", "--store", store_url, "--host", HOST]
    command += [
        "--port",
        str(port),
        "--api-key",
        KEY,
        "--max-tokens",
        "16",
        "--max-body-mb",
        str(MAX_BODY_MB),
    ]
    command += ["--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S)]
    if not capture:
        command.append("--no-capture")
    env = {**os.environ, "HONED_SPOOL_DIR": str(root / "spool")}
    with (root / "server.log").open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=1).status_code == 200:
                return process, port
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"honed serve did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.2)


def good_body(i: int) -> dict[str, Any]:
    question = f"request {i}: what is {i % 97} plus {i % 13}?"
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 16,
        "temperature": 1.0,
    }


async def good_requests(client: httpx.AsyncClient, count: int) -> tuple[int, list[float], Counter[Any]]:
    async def one(i: int) -> tuple[int | str, float]:
        started = time.monotonic()
        try:
            response = await client.post("/v1/chat/completions", json=good_body(i))
            status: int | str = response.status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        return status, time.monotonic() - started

    results = await asyncio.gather(*(one(i) for i in range(count)))
    ok = [latency for status, latency in results if status == 200]
    return len(ok), ok, Counter(status for status, _ in results)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# -- hostile clients ---------------------------------------------------------------------------------

HOSTILE_BODIES: list[tuple[str, bytes]] = [
    (
        "client template",
        json.dumps({**good_body(0), "chat_template_kwargs": {"chat_template": SLOW_TEMPLATE}}).encode(),
    ),
    ("top_p=-1", json.dumps({**good_body(1), "top_p": -1}).encode()),
    ("temperature=1e-45", json.dumps({**good_body(2), "temperature": 1e-45}).encode()),  # valid: greedy
    ("temperature=-1", json.dumps({**good_body(3), "temperature": -1}).encode()),
    ("temperature=NaN", json.dumps({**good_body(4), "temperature": float("nan")}).encode()),
    ("max_tokens=1e400", json.dumps(good_body(5)).encode()[:-1] + b', "max_tokens": 1e400}'),
    (
        'tool_calls="abc"',
        json.dumps(
            {
                **good_body(6),
                "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": "abc"}],
            }
        ).encode(),
    ),
    ("deep nesting", b"[" * 200_000),
    (
        "deep metadata",
        json.dumps(good_body(7)).encode()[:-1] + b', "metadata": ' + b'{"a": ' * 500 + b"1" + b"}" * 501,
    ),
    (
        "labels from a plain key",
        json.dumps(
            {**good_body(8), "metadata": {"split": "heldout", "expected": "42", "tests": "def test(): pass"}}
        ).encode(),
    ),
]


async def post_raw(client: httpx.AsyncClient, kind: str, raw: bytes, seen: Counter[Any]) -> None:
    try:
        response = await client.post(
            "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}
        )
        seen[(kind, response.status_code)] += 1
    except httpx.HTTPError as exc:
        seen[(kind, type(exc).__name__)] += 1


async def huge_message(client: httpx.AsyncClient, seen: Counter[Any]) -> None:
    body = {
        **good_body(9),
        "messages": [{"role": "user", "content": "lorem ipsum dolor sit amet " * 230_000}],
    }
    await post_raw(client, "6 MB message", json.dumps(body).encode(), seen)


async def chunked_oversize(client: httpx.AsyncClient, seen: Counter[Any]) -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(3 * MAX_BODY_MB * 16):
            yield b" " * 65536

    try:
        response = await client.post("/v1/chat/completions", content=chunks())
        seen[("chunked body 3x the limit", response.status_code)] += 1
    except httpx.HTTPError as exc:
        seen[("chunked body 3x the limit", type(exc).__name__)] += 1


async def declared_oversize(port: int, seen: Counter[Any]) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: {1 << 30}\r\n\r\n".encode()
    )
    await writer.drain()
    try:
        line = await asyncio.wait_for(reader.readline(), 30)
        seen[("declared 1 GB body", line.split(b" ")[1].decode() if line else "closed")] += 1
    except TimeoutError:
        seen[("declared 1 GB body", "no answer in 30 s")] += 1
    writer.close()


async def slow_client(
    port: int, kind: str, stop: asyncio.Event, held: list[float], seen: Counter[Any]
) -> None:
    """Trickle a byte every 0.5 s (headers, a body, or nothing at all); when the server closes
    the connection, note how long it was held and start over, until `stop`."""
    body = json.dumps(good_body(10)).encode()
    while not stop.is_set():
        reader, writer = await asyncio.open_connection(HOST, port)
        opened, answer = time.monotonic(), b""
        if kind == "slow headers":
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\n")
            trickle = b"X-Slow: " + b"a" * 100_000
        elif kind == "slow body":
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            )
            trickle = body
        else:
            trickle = b""
        i = 0
        try:
            while not stop.is_set():
                try:
                    data = await asyncio.wait_for(reader.read(65536), 0.5)
                except TimeoutError:
                    if i < len(trickle):
                        writer.write(trickle[i : i + 1])
                        await writer.drain()
                        i += 1
                    continue
                if not data:
                    break
                answer += data
        except (ConnectionError, OSError):
            pass
        if not stop.is_set():
            held.append(time.monotonic() - opened)
            seen[(kind, answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/") else "closed")] += 1
        writer.close()


async def hostile_phase(port: int, good: int, rounds: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    headers = {"Authorization": f"Bearer {KEY}"}
    seen: Counter[Any] = Counter()
    held: dict[str, list[float]] = {"slow headers": [], "slow body": [], "idle": []}
    stop = asyncio.Event()
    async with (
        httpx.AsyncClient(
            base_url=f"http://{HOST}:{port}", headers=headers, timeout=120, limits=limits
        ) as client,
        httpx.AsyncClient(
            base_url=f"http://{HOST}:{port}", headers=headers, timeout=120, limits=limits
        ) as hostile,
    ):
        slow = [
            asyncio.create_task(slow_client(port, kind, stop, held[kind], seen))
            for kind, n in (("slow headers", 40), ("slow body", 20), ("idle", 40))
            for _ in range(n)
        ]
        attacks = []
        for _ in range(rounds):
            attacks += [post_raw(hostile, kind, raw, seen) for kind, raw in HOSTILE_BODIES]
        attacks += [huge_message(hostile, seen) for _ in range(4)]
        attacks += [chunked_oversize(hostile, seen) for _ in range(2)]
        attacks += [declared_oversize(port, seen) for _ in range(5)]
        await asyncio.sleep(0.5)  # the slow clients are connected
        attack = asyncio.gather(*attacks)
        count, latencies, statuses = await good_requests(client, good)
        await attack
        await asyncio.sleep(
            max(HEADER_TIMEOUT_S, BODY_TIMEOUT_S) + 1
        )  # every slow connection cut at least once
        stop.set()
        await asyncio.gather(*slow, return_exceptions=True)
    return {"ok": count, "latencies": latencies, "statuses": statuses, "hostile": seen, "held": held}


async def plain_phase(port: int, good: int) -> tuple[int, list[float], Counter[Any]]:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    async with httpx.AsyncClient(
        base_url=f"http://{HOST}:{port}",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
        limits=limits,
    ) as client:
        return await good_requests(client, good)


def line(name: str, ok: int, total: int, latencies: list[float], statuses: Counter[Any]) -> str:
    other = {k: v for k, v in statuses.items() if k != 200}
    return (
        f"{name:<24} {ok:>4}/{total} ok   p50 {percentile(latencies, 0.5):6.2f} s   "
        f"p99 {percentile(latencies, 0.99):6.2f} s   {('other: ' + str(other)) if other else ''}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--good", type=int, default=200, help="concurrent good requests per phase (<= 1000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of hostile requests (<= 50)")
    parser.add_argument("--seconds", type=float, default=300, help="give up after this long")
    parser.add_argument("--no-capture", action="store_true", help="run the server with --no-capture")
    args = parser.parse_args()
    good, rounds = min(args.good, 1000), min(args.rounds, 50)

    with tempfile.TemporaryDirectory(prefix="honed-hostile-") as tmp:
        root = Path(tmp)
        process, port = start_server(root, capture=not args.no_capture)
        try:
            rss_boot = rss_mb(process.pid)
            httpx.post(
                f"http://{HOST}:{port}/v1/chat/completions",
                json=good_body(0),
                headers={"Authorization": f"Bearer {KEY}"},
                timeout=60,
            )
            time.sleep(1)
            rss_start = rss_mb(process.pid)

            rss_phases: list[float] = []

            async def run() -> tuple[Any, ...]:
                base = await plain_phase(port, good)
                rss_phases.append(rss_mb(process.pid))
                attacked = await hostile_phase(port, good, rounds)
                rss_phases.append(rss_mb(process.pid))
                after = await plain_phase(port, good)
                return base, attacked, after

            started = time.monotonic()
            base, attacked, after = asyncio.run(asyncio.wait_for(run(), args.seconds))
            elapsed = time.monotonic() - started
            time.sleep(2)
            rss_end = rss_mb(process.pid)
            alive = process.poll() is None
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()

    print(
        f"honed serve under hostile traffic: {good} concurrent good requests per phase, tiny model, 127.0.0.1"
    )
    print(f"  (capture {'off' if args.no_capture else 'on'}; {os.cpu_count()} CPUs; {elapsed:.0f} s in all)")
    print(line("baseline", base[0], good, base[1], base[2]))
    print(line("with hostile clients", attacked["ok"], good, attacked["latencies"], attacked["statuses"]))
    print(line("after", after[0], good, after[1], after[2]))
    p99_base, p99_hostile = percentile(base[1], 0.99), percentile(attacked["latencies"], 0.99)
    ratio = p99_hostile / p99_base if p99_base else float("nan")
    print(
        f"p99 with hostile clients / baseline: {ratio:.2f}x (target <= 2x: {'met' if ratio <= 2 else 'MISSED'})"
    )
    every = base[0] == attacked["ok"] == after[0] == good
    print(f"every good request succeeded: {'yes' if every else 'NO'}; server alive at the end: {alive}")
    print("hostile clients got:")
    for (kind, status), n in sorted(attacked["hostile"].items(), key=lambda item: str(item[0])):
        print(f"  {kind:<28} {status!s:<18} x{n}")
    for kind, times in attacked["held"].items():
        if times:
            print(
                f"  {kind:<28} connections held at most {max(times):.1f} s (median {statistics.median(times):.1f} s)"
            )
    print(
        f"server RSS after each phase: baseline {rss_phases[0]:.0f} MB, hostile {rss_phases[1]:.0f} MB, "
        f"after {rss_end:.0f} MB"
    )
    growth = (rss_end - rss_start) / rss_start
    print(
        f"server RSS: {rss_boot:.0f} MB at boot, {rss_start:.0f} MB at start (after a warm-up request), "
        f"{rss_end:.0f} MB at the end: {growth:+.1%} (target within 20%: {'met' if abs(growth) <= 0.2 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
