"""Redaction benchmark: microseconds per KB of text, ordinary and hostile, and one huge hostile field.

    .venv/bin/python benchmarks/redact.py [--quick]

Prints figures measured in this one run; it asserts nothing (machines are noisy) and is not part of
the test suite. Each figure is the best of several timings of `Redactor.redact_text` on the same
text, divided by its size in KB (1,024 characters):

- *prose*: agent text with no candidate for any rule (the prefilter lets it through);
- *ordinary with candidates*: tool output and messages that mention keys, tokens and passwords, and
  hold a few real secrets, so every rule and detect-secrets run;
- *hostile*: 64 KB of one shape the rules or detect-secrets' regexes backtrack on (`eyJ` repeated,
  runs of keywords, backticks, ...), the worst and the median over the shapes;
- *160 KB hostile field*: `Serializer.field` (cap first, then redaction of the kept head) on the
  worst hostile shape, in ms.
"""

from __future__ import annotations

import argparse
import random
import statistics
import string
import time
from collections.abc import Callable

HOSTILE = {
    "eyJ": "eyJ",
    "eyJ dotted": "eyJabcdefghi.",
    "capitals": "A",
    "AKIA": "AKIA",
    "ghp_": "ghp_",
    "-----BEGIN": "-----BEGIN ",
    "sk-": "sk-",
    "sk_live_": "sk_live_",
    "hf_": "hf_",
    "xoxb-": "xoxb-",
    "://a:": "://a:",
    "authorization: ": "authorization: ",
    "pwd": "pwd",
    "secret_": "secret_",
    "password='": "password='",
    "`db_pass": "`db_pass",
    "//": "//",
    "sq0csp-": "sq0csp-",
    "detect-secrets lines": "pwd" * 160 + " secrets = 'a1' ",
    "detect-secrets backticks": "`db_pass" * 60 + " secrets = 'a1' ",
}


_WORDS = """the agent looked up weather in Paris and added numbers for user then answered with sum of
results from tool call which returned a list of rows sorted by date"""


def _prose(rng: random.Random, size: int) -> str:
    words = _WORDS.split()
    out: list[str] = []
    length = 0
    while length < size:
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(6, 16))).capitalize() + ". "
        out.append(sentence)
        length += len(sentence)
    return "".join(out)[:size]


def _with_candidates(rng: random.Random, size: int) -> str:
    alnum = string.ascii_letters + string.digits

    def rand(n: int) -> str:
        return "".join(rng.choice(alnum) for _ in range(n))

    lines = [
        "Using max_tokens = 1024 and the key insight that the token count is small.",
        '{"role": "tool", "content": "rows: 12", "usage": {"input_tokens": 51, "output_tokens": 7}}',
        "The bearer of bad news: authorization required before we can continue.",
        f"curl -H 'Authorization: Bearer {rand(40)}' https://api.example.com/v1/items",
        f"export OPENAI_API_KEY=sk-proj-{rand(60)}T3BlbkFJ{rand(40)}",
        'config = {"password": "' + rand(14) + '", "host": "db.internal", "port": 5432}',
        "def get_key(d, key): return d.get(key)  # secret sauce: none",
        f"connect postgresql://app:{rand(16)}@db.internal:5432/app",
        f"webhook signed with whsec_{rand(32)} and sendgrid SG.{rand(22)}.{rand(43)}",
    ]
    out: list[str] = []
    length = 0
    while length < size:
        line = rng.choice(lines) + "\n" + _prose(rng, 200) + "\n"
        out.append(line)
        length += len(line)
    return "".join(out)[:size]


def _best(call: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def _us_per_kb(redact: Callable[[str], str], text: str, repeats: int) -> float:
    return _best(lambda: redact(text), repeats) / (len(text) / 1024) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a few seconds)")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5

    from honed.capture.serialize import Serializer
    from honed.redaction.redact import Redactor

    redactor = Redactor()
    redactor.redact_text("warm up: password='hunter2' and detect-secrets' settings")
    rng = random.Random(1)
    size = 64 * 1024

    rows: list[tuple[str, float]] = []
    rows.append(("prose (prefilter only)", _us_per_kb(redactor.redact_text, _prose(rng, size), repeats)))
    rows.append(
        ("ordinary with candidates", _us_per_kb(redactor.redact_text, _with_candidates(rng, size), repeats))
    )
    hostile = {
        name: _us_per_kb(redactor.redact_text, (unit * (size // len(unit) + 1))[:size], repeats)
        for name, unit in HOSTILE.items()
    }
    worst = max(hostile, key=hostile.__getitem__)
    rows.append(("hostile, median of shapes", statistics.median(hostile.values())))
    rows.append((f"hostile, worst ({worst})", hostile[worst]))

    print(f"redaction, us per KB (64 KB texts, best of {repeats})")
    for name, value in rows:
        print(f"  {name:<40} {value:10.1f}")
    print("hostile shapes, us per KB:")
    for name, value in sorted(hostile.items(), key=lambda item: -item[1]):
        print(f"  {name:<40} {value:10.1f}")

    unit = HOSTILE[worst]
    field = "token ghp_" + "a" * 36 + "\n" + (unit * (160_000 // len(unit) + 1))[:160_000]
    serializer = Serializer(redactor=redactor)
    took = _best(lambda: serializer.field(field), repeats)
    print(f"160 KB hostile field ({worst}), capped then redacted: {took * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
