"""Secrets that used to reach the store, redaction that used to be quadratic, and the cap before redaction.

Each leak below was reproduced on the code before this file (a8e9d52): the secret reached the store.
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
import string
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent

import honed
from fakes import ToolScriptModel
from honed.capture.redact import Redactor
from honed.capture.serialize import Serializer
from honed.trajectory import is_truncated

_rng = random.Random(20260114)
ALNUM = string.ascii_letters + string.digits


def rand(n: int, alphabet: str = ALNUM) -> str:
    return "".join(_rng.choice(alphabet) for _ in range(n))


def pieces_left(secret: str, text: str) -> list[str]:
    """The 6-character pieces of `secret` still in `text` (markers aside: they name the kind)."""
    text = re.sub(r"\[REDACTED:[a-z0-9_]+\]", "", text)
    return [secret[i : i + 6] for i in range(len(secret) - 5) if secret[i : i + 6] in text]


def assert_gone(secret: str, text: str) -> None:
    leaked = pieces_left(secret, text)
    assert not leaked, f"secret pieces survived: {leaked[:3]} in {text[:300]!r}"


# --- Secrets in free text ----------------------------------------------------------------------------

HF_TOKEN = "hf_" + rand(34)
STRIPE_TEST = "sk_test_" + rand(24)
STRIPE_LIVE = "sk_live_" + rand(99)
STRIPE_RESTRICTED = "rk_live_" + rand(24)
SLACK_APP = f"xapp-1-A{rand(10, string.digits)}-{rand(13, string.digits)}-{rand(64, '0123456789abcdef')}"
SLACK_CONFIG = f"xoxe.xoxp-1-{rand(140)}"
SLACK_REFRESH = f"xoxe-1-{rand(140)}"

FREE_TEXT = {
    "huggingface_token": (HF_TOKEN, "export HF_TOKEN={} && huggingface-cli whoami"),
    "huggingface_token_in_prose": (HF_TOKEN, "the hub rejected {}, try again"),
    "stripe_test_key": (STRIPE_TEST, "stripe.api_key = {}"),
    "stripe_test_key_in_prose": (STRIPE_TEST, "charged the card with {} in test mode"),
    "stripe_live_key": (STRIPE_LIVE, "curl https://api.stripe.com/v1/charges -u {}:"),
    "stripe_restricted_key": (STRIPE_RESTRICTED, "restricted key {} can only read"),
    "slack_app_token": (SLACK_APP, "socket mode needs {} to connect"),
    "slack_config_token": (SLACK_CONFIG, "rotate {} tonight"),
    "slack_refresh_token": (SLACK_REFRESH, "refresh with {}"),
}


@pytest.mark.parametrize("name", sorted(FREE_TEXT))
def test_vendor_tokens_in_free_text_are_redacted(name: str) -> None:
    """HF `hf_...`, Stripe `sk_test_`/`sk_live_`/`rk_live_`, Slack `xapp-`/`xoxe`: all reached the store."""
    secret, template = FREE_TEXT[name]
    out = Redactor().redact_text(template.format(secret))
    assert "[REDACTED:" in out
    assert_gone(secret, out)


# --- Values under keys that name a secret ------------------------------------------------------------

AWS_SECRET = rand(40, ALNUM + "/+")
SECRET_KEYS = [
    "secret",
    "secret_key",
    "secret_access_key",
    "SecretAccessKey",
    "secretAccessKey",
    "aws_secret_access_key",
    "AWS_SECRET_ACCESS_KEY",
    "api_key",
    "apiKey",
    "X-Api-Key",
    "token",
    "github_token",
    "botToken",
    "SessionToken",
    "password",
    "passwd",
    "DB_PASSWORD",
    "private_key",
    "client_secret",
    "clientSecret",
    "webhook_secret",
    "auth",
    "basic_auth",
    "authorization",
    "credentials",
    "aws_credentials",
    "creds",
]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_a_secret_named_key_hides_its_value_whatever_it_looks_like(key: str) -> None:
    """`{"secret_access_key": <AWS secret>}` reached the store: only some key names were known."""
    for value in (
        AWS_SECRET,
        "letmein",
        "correct horse battery staple",
        {"nested": AWS_SECRET},
        [AWS_SECRET],
    ):
        out = Redactor().redact({"service": "s3", key: value})
        assert out["service"] == "s3"
        assert isinstance(out[key], str) and out[key].startswith("[REDACTED:"), (key, value, out)
        assert_gone(AWS_SECRET, json.dumps(out))


@pytest.mark.parametrize(
    "key",
    [
        "tokens",
        "input_tokens",
        "max_tokens",
        "token_count",
        "eos_token",
        "pad_token",
        "next_page_token",
        "nextPageToken",
        "secret_name",
        "secret_arn",
        "auth_type",
        "token_type",
        "key",
        "keys",
        "monkey",
        "author",
        "pass",
    ],
)
def test_keys_that_only_look_like_secret_names_keep_their_values(key: str) -> None:
    value = {"usage": 3, key: "visible-value"}
    assert Redactor().redact(value) == value


def test_flags_and_empty_values_under_secret_names_are_kept() -> None:
    value = {"auth": False, "password": None, "token": "", "credentials": True}
    assert Redactor().redact(value) == value


# --- Through the real capture path to SQLite ---------------------------------------------------------


def stored_everything(url: str, spool: Path) -> str:
    """Every row of the SQLite store as SQL text, plus the raw database bytes and any spool file."""
    path = Path(url.removeprefix("sqlite:///"))
    with sqlite3.connect(path) as conn:
        dump = "\n".join(conn.iterdump())
    files = [path, *spool.rglob("*")] if spool.exists() else [path]
    raw = b"".join(p.read_bytes() for p in files if p.is_file())
    return dump + "\n" + raw.decode("utf-8", "replace")


def test_leaked_secrets_never_reach_the_sqlite_store(sqlite_url: str, tmp_path: Path) -> None:
    from langchain_core.tools import tool

    text_secrets = [HF_TOKEN, STRIPE_TEST, STRIPE_LIVE, STRIPE_RESTRICTED, SLACK_APP, SLACK_CONFIG]

    @tool(response_format="content_and_artifact")
    def fetch_config(name: str) -> tuple[str, dict[str, Any]]:
        """Return a config file as text, and the parsed config as the artifact."""
        text = "\n".join(f"line {i}: use {secret} here" for i, secret in enumerate(text_secrets))
        parsed = {
            "aws": {"access_key_id": "AKIA" + "Q" * 16, "secret_access_key": AWS_SECRET},
            "Credentials": {"SessionToken": "plain-looking-session", "Expiration": "2030"},
            "auth": "letmein-plain",
            "clientSecret": "also-plain",
        }
        return text, parsed

    capture = honed.Middleware(store=sqlite_url)
    agent = create_agent(ToolScriptModel(), [fetch_config], name="leaky", middleware=[capture])
    agent.invoke({"messages": [("user", 'call fetch_config {"name": "prod"}; answer got it: {result}')]})
    assert honed.flush()

    everything = stored_everything(sqlite_url, tmp_path / "spool")
    for secret in [*text_secrets, AWS_SECRET, "letmein-plain", "also-plain", "plain-looking-session"]:
        assert_gone(secret, everything)
    t = honed.open_store(sqlite_url).trajectories(limit=5)[0]
    assert [s.name for s in t.tool_steps()] == ["fetch_config"]
    assert "[REDACTED:huggingface_token]" in json.dumps(t.to_dict())


# --- Linear time on hostile text ---------------------------------------------------------------------

HOSTILE = {
    "jwt_headers": "eyJ",
    "jwt_dotted": "eyJabcdefghi.",
    "capitals": "A",
    "aws_prefix": "AKIA",
    "github_prefix": "ghp_",
    "pem_header": "-----BEGIN ",
    "pem_body": "-----BEGIN RSA PRIVATE KEY-----\n-----END A ",
    "openai_prefix": "sk-",
    "stripe_prefix": "sk_live_",
    "huggingface_prefix": "hf_",
    "slack_prefix": "xoxb-",
    "url_password": "://a:",
    "authorization": "authorization: ",
    "keyword_word": "pwd",
    "keyword_underscore": "secret_",
    "quoted_password": "password='",
    "backtick_keyword": "`db_pass",
    "slashes": "//",
    "detect_secrets_literal": "sq0csp-",
    # A candidate line for detect-secrets every 500 characters, full of what its regexes backtrack on.
    "detect_secrets_window": "pwd" * 160 + " secrets = 'a1' ",
    "detect_secrets_backticks": "`db_pass" * 60 + " secrets = 'a1' ",
}


def best_times(calls: list[Callable[[], object]], repeats: int = 5) -> list[float]:
    """The best CPU time of each call (this thread's: other processes' load does not count) over
    `repeats` rounds, the calls interleaved."""
    best = [float("inf")] * len(calls)
    for _ in range(repeats):
        for i, call in enumerate(calls):
            start = time.thread_time()
            call()
            best[i] = min(best[i], time.thread_time() - start)
    return best


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_redaction_is_linear_on_hostile_text(name: str) -> None:
    """`eyJ` repeated was quadratic in the JWT rule (64 KB took 2.4 s); no pattern may be."""
    unit = HOSTILE[name]
    redactor = Redactor()
    redactor.redact_text("warm up: password='hunter2' " + unit)
    small_text = (unit * (4_000 // len(unit) + 1))[:4_000]
    large_text = (unit * (32_000 // len(unit) + 1))[:32_000]
    small, large = best_times(
        [lambda: redactor.redact_text(small_text), lambda: redactor.redact_text(large_text)]
    )
    # 8x the input: linear is ~8x, quadratic ~64x. Timings this small on a shared machine are noisy,
    # hence the wide margin, and under 0.1 s nothing can be wrong enough to matter.
    assert large < 0.1 or large / small < 20, f"{name}: {small * 1e3:.1f} ms -> {large * 1e3:.1f} ms"
    assert large < 2.0, f"{name}: 32 KB took {large:.2f} s"


# --- The cap comes before redaction ------------------------------------------------------------------


def hostile_result(unit: str, size: int = 160_000) -> str:
    """`size` characters of `unit` over and over, after one real secret."""
    head = f"token ghp_{rand(36)} ok\n"
    return head + (unit * (size // len(unit) + 1))[: size - len(head)]


@pytest.mark.parametrize(
    "name", ["jwt_headers", "detect_secrets_window", "detect_secrets_backticks", "keyword_word", "slashes"]
)
def test_a_160kb_hostile_field_is_capped_and_redacted_quickly(name: str) -> None:
    """Redaction ran before the 64 KiB cap: one 160 KB hostile tool result stalled the writer ~25 s."""
    text = hostile_result(HOSTILE[name])
    secret = text.split()[1]
    serializer = Serializer(redactor=Redactor())
    serializer.field("warm up: password='hunter2'")
    for value in (text, {"output": text}):
        start = time.thread_time()
        out = serializer.field(value)
        took = time.thread_time() - start
        assert took < 3.0, f"a 160 KB field took {took:.2f} s"
        assert is_truncated(out) and "sha256" not in out
        assert out["size"] >= 160_000
        assert len(json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode()) <= 65_536
        assert "[REDACTED:github_token]" in out["preview"] and secret not in out["preview"]


def test_a_160kb_hostile_tool_result_through_capture(sqlite_url: str) -> None:
    from langchain_core.tools import tool

    text = hostile_result("eyJ")
    secret = text.split()[1]

    @tool
    def dump(n: int) -> str:
        """Return a huge hostile text."""
        return text

    agent = create_agent(
        ToolScriptModel(), [dump], name="huge", middleware=[honed.Middleware(store=sqlite_url)]
    )
    # The text is stored twice: as the tool's result and in the last model call's input.
    start = time.perf_counter()
    agent.invoke({"messages": [("user", 'call dump {"n": 1}; answer done')]})
    flushed = honed.flush(timeout=20)
    took = time.perf_counter() - start
    assert flushed and took < 10.0, f"capturing one 160 KB hostile result took {took:.2f} s"
    t = honed.open_store(sqlite_url).trajectories(limit=5)[0]
    (step,) = t.tool_steps()
    assert is_truncated(step.output) and step.output["size"] >= 160_000
    assert secret not in json.dumps(t.to_dict())


# --- A secret the cut splits leaves nothing behind ---------------------------------------------------


def _jwt(payload_chars: int) -> str:
    return f"eyJhbGciOiJIUzI1NiJ9.eyJ{rand(payload_chars, ALNUM + '-_')}.{rand(43, ALNUM + '-_')}"


CUT_SECRETS = {
    "github_token": "ghp_" + rand(36),
    "openai_key": "sk-proj-" + rand(64, ALNUM + "-_") + "T3BlbkFJ" + rand(64),
    "huggingface_token": HF_TOKEN,
    "jwt": _jwt(300),
    "jwt_longer_than_the_margin": _jwt(6_000),
    "unknown_token": "zz" + rand(120),  # no rule knows it: only the cut's own care hides its head
}


@pytest.mark.parametrize("name", sorted(CUT_SECRETS))
def test_a_secret_straddling_the_cap_leaves_no_prefix_in_the_preview(name: str) -> None:
    secret = CUT_SECRETS[name]
    cap = 1024
    serializer = Serializer(max_field_bytes=cap, redactor=Redactor())
    for offset in range(500, 1100, 13):  # the secret starts before, at, and after the preview's end
        text = "word " * (offset // 5) + secret + " tail" * 2000
        for value in (text, {"log": text}):
            out = serializer.field(value)
            assert is_truncated(out)
            if name == "unknown_token":  # not a secret to the rules: only its split head must go
                preview = out["preview"]
                assert preview.endswith(secret) or not any(
                    preview.endswith(secret[:n]) for n in range(6, len(secret))
                ), (offset, preview[-80:])
            else:
                assert_gone(secret, json.dumps(out))


# --- Rewritten for linear time, still as wide -------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "token {} ok",
        "Bearer {}",
        "tokeneyJ{}",  # glued to a word: the word stays, the JWT goes
        "line one\\n{}",  # after an escaped newline in JSON-in-a-string
        "session.{}.more",  # inside a longer dotted run
        "a.b.c.{}",
    ],
)
def test_jwts_are_found_in_any_context(template: str) -> None:
    jwt = _jwt(80)
    text = template.format(jwt[3:] if template.startswith("tokeneyJ") else jwt)
    out = Redactor().redact_text(text)
    assert "[REDACTED:jwt]" in out
    assert_gone(jwt[3:], out)


def test_many_short_candidate_lines_are_scanned_by_detect_secrets_in_few_calls() -> None:
    keys = [f"SG.{rand(22)}.{rand(43)}" for _ in range(300)]
    text = "\n".join(f"mail {i}: {key}" for i, key in enumerate(keys))
    redactor = Redactor()
    redactor.redact_text("warm up: password='hunter2'")
    start = time.thread_time()
    out = redactor.redact_text(text)
    took = time.thread_time() - start
    assert out.count("[REDACTED:sendgrid_api_key]") == len(keys)
    for key in keys:
        assert key not in out
    assert took < 2.0, f"{len(keys)} short lines took {took:.2f} s"


def test_windows_scanned_together_do_not_match_across_windows() -> None:
    # Two candidate lines, apart: one detect-secrets call scans both; a keyword ending the first must not
    # pair with a value starting the second.
    text = "x = 1 # sq0csp- password\nplain words\n= 'not-a-secret-across-windows' # sq0csp-"
    assert "not-a-secret-across-windows" in Redactor().redact_text(text)


def test_tool_schemas_keep_parameters_named_like_secrets() -> None:
    """A tool's JSON schema names its parameters: `password`, `auth`, `api_key` there are not secrets."""
    key = "ghp_" + rand(36)
    schema = {
        "type": "function",
        "function": {
            "name": "login",
            "parameters": {
                "type": "object",
                "properties": {
                    "password": {"type": "string", "description": "the user's password"},
                    "auth": {"type": "object", "properties": {"token": {"type": "string"}}},
                    "api_key": {"type": "string", "default": key},
                },
                "required": ["password"],
            },
        },
    }
    out = Redactor().redact(schema)
    properties = out["function"]["parameters"]["properties"]
    assert properties["password"] == {"type": "string", "description": "the user's password"}
    assert properties["auth"] == {"type": "object", "properties": {"token": {"type": "string"}}}
    assert properties["api_key"] == {"type": "string", "default": "[REDACTED:github_token]"}
    # Not a schema: a plain dict under "properties" keeps its keys' meaning.
    assert Redactor().redact({"properties": {"password": "hunter2"}}) == {
        "properties": {"password": "[REDACTED:password]"}
    }


def test_detect_secrets_skips_what_the_rules_already_redacted() -> None:
    from honed.capture._textmatch import lower
    from honed.capture.secret_scan import candidate_spans

    done = "password = '[REDACTED:password]' and PWD='[REDACTED:password]';"
    assert candidate_spans(done, lower(done)) == []
    todo = "secrets = 'abc123xyz'"
    assert candidate_spans(todo, lower(todo)) == [(0, len(todo))]
