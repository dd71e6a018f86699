"""Secrets that used to reach the store, redaction that used to be quadratic, and the cap before redaction.

Each leak below was reproduced on the code before this file (a8e9d52): the secret reached the store.
"""

from __future__ import annotations

import base64
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
from honed.capture.serialize import Serializer
from honed.redaction.redact import Redactor
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
SLACK_WEBHOOK = f"https://hooks.slack.com/services/T{rand(8)}/B{rand(8)}/{rand(24)}"
NPM_TOKEN = "npm_" + rand(36)

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
    # A QA pass (session 15): the prefilter never handed a bare webhook URL to its rule, and no
    # rule knew npm's tokens (detect-secrets knows only the `_authToken=` line of an .npmrc).
    "slack_webhook": (SLACK_WEBHOOK, "post the alert to {}"),
    "npm_token": (NPM_TOKEN, "publish with {} from CI"),
    # A QA pass (session 16): the keys a LangChain agent's process holds beside its model's.
    "langsmith_key": (
        "lsv2_pt_" + rand(32, "0123456789abcdef") + "_" + rand(10, "0123456789abcdef"),
        "LANGSMITH_API_KEY={}",
    ),
    "langsmith_key_in_prose": (
        "lsv2_sk_" + rand(32, "0123456789abcdef") + "_" + rand(10, "0123456789abcdef"),
        "my LangSmith key is {}; answer ok",
    ),
    "tavily_key": ("tvly-dev-" + rand(32), "Tavily 401: invalid api key {}"),
    "groq_key": ("gsk_" + rand(52), "client = Groq(api_key='{}')"),
    "xai_key": ("xai-" + rand(80), "XAI_API_KEY={}"),
    "perplexity_key": ("pplx-" + rand(48), "the key {} was revoked"),
    "nvidia_key": ("nvapi-" + rand(64), "export NVIDIA_API_KEY={}"),
    "sql_identified_by": ("Sq1" + rand(12), "CREATE USER 'app'@'%' IDENTIFIED BY '{}';"),
    "sql_identified_by_bare": ("Sq1" + rand(12), "alter user app identified by {}"),
    # A QA pass (session 17): vendor tokens, connection-string keys and signed URLs no rule knew.
    "vault_token": ("hvs." + rand(90), "VAULT_TOKEN={} vault kv get secret/app"),
    "digitalocean_token": ("dop_v1_" + rand(64, "0123456789abcdef"), "doctl auth init -t {}"),
    "shopify_token": ("shpat_" + rand(32, "0123456789abcdef"), "the store's admin token is {}"),
    "google_oauth_token": ("ya29." + rand(60), "GET /drive/v3/files with access token {}"),
    "google_refresh_token": ("1//0" + rand(60), "refresh_token: {}"),
    "discord_webhook": (
        f"https://discord.com/api/webhooks/{rand(18, string.digits)}/{rand(68)}",
        "post the build status to {}",
    ),
    "azure_account_key": (
        rand(86) + "==",
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={};EndpointSuffix=core.windows.net",
    ),
    "azure_sas_sig": (rand(43) + "%3D", "https://acct.blob.core.windows.net/c/f?sv=2021-06-08&sp=r&sig={}"),
    "s3_presigned": (
        rand(64, "0123456789abcdef"),
        "https://b.s3.amazonaws.com/k?X-Amz-Expires=60&X-Amz-Signature={}",
    ),
    "apim_subscription_key": (rand(32, "0123456789abcdef"), "Ocp-Apim-Subscription-Key: {}"),
    "api_key_flag_spaced": (rand(32), "mycli deploy --api-key {} --region eu"),
    "token_flag_spaced": (rand(32), "gh-runner register --token {}"),
    # honed's own label key (a QA pass, session 18: its holder may label runs)
    "label_key_env": (rand(12), "PATH=/usr/bin\nHONED_LABEL_KEY={}\nHOME=/root"),
    "label_key_flag": (rand(12), "honed serve agent --label-key {} --port 8000"),
    # JSON from a Java service: Gson escapes `=`, `&`, `<`, `>`, `'` (a QA pass, session 27).
    "gson_query_key": (
        rand(32),
        '{{"next":"https://api.example.com/v1?api_key\\u003d{}\\u0026page\\u003d2"}}',
    ),
    "gson_in_a_log_line": (rand(32), 'resp={{"dsn":"host=db user=app password\\u003d{}"}} status=200'),
    # A key glued to a word by `-` or `_` was taken for the end of that word (a QA pass, session 28).
    "openai_key_after_a_dash": ("sk-proj-" + rand(40), "use prod-{} for the batch"),
    "openai_key_after_an_underscore": ("sk-proj-" + rand(40), "team_{}"),
    "anthropic_key_after_a_dash": ("sk-ant-api03-" + rand(40), "acct-{}"),
    "aws_key_after_a_name": ("AKIA" + rand(16, string.ascii_uppercase + string.digits), "AWS_KEY_{}"),
    "card_number_in_json_text": ("4111111111111111", '{{"card_number": "{}", "amount": 5}}'),
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
    "pw",
    "db_pw",
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
    "passwords",  # plural names held their values (a QA pass, session 15)
    "secrets",
    "api_keys",
    "clientSecrets",
    "AccountKey",  # Azure (a QA pass, session 17)
    "SharedAccessKey",
    "Ocp-Apim-Subscription-Key",
    "label_key",  # honed serve's (a QA pass, session 18)
    "HONED_LABEL_KEY",
    "card_number",  # its `cvv` was redacted, not its number (a QA pass, session 28)
    "cardNumber",
    "credit_card",
    "primary_account_number",
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
        "passed",
        "bypass",
        "pwm",
        "npw",
        "pan",  # a camera's (a QA pass, session 28: a card number's key took its tool arguments)
        "panel",
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
    "curl_user": " -u a:",
    "short_password_flag": "mysql -p'",
    "password_flag": "--password '",
    "netrc": "login a password ",
    "named_pair": "[['password', '",
    "named_entry": "'name': 'pwd', 'value': '",
    "url_token": "https://",
    "url_encoded_key": "sk%2D",
    # A QA pass (session 16): an encoded URL's password ran from every `%3a%2f%2f` to the end.
    "url_encoded_url": "%3a%2f%2f",
    "url_encoded_userinfo": "%3a%2f%2fa%3ab",
    "new_vendor_prefixes": "lsv2_pt_tvly-gsk_xai-pplx-nvapi-",
    "sql_identified_by": "identified by '",
    # Session 25's rules: a name and its value in a line, a flag named as a key is, PuTTY, SSM.
    "named_line": "\n| DB_PASSWORD |",
    "named_line_spaces": "DB_PASSWORD  \t ",
    "named_flag": "--db-pass=",
    "putty_lines": "Private-Lines: 1\n",
    "secure_string": "\tSecureString\t",
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
    # `_builtin`, not `redact_text`: the latter remembers texts up to a size, so the 4 KB one was
    # a cache lookup (0.0 ms) and only the absolute bound below ever decided (and, on a slower
    # machine, failed at 114 ms though the rule is linear).
    small, large = best_times([lambda: redactor._builtin(small_text), lambda: redactor._builtin(large_text)])
    # 8x the input: linear is ~8x, quadratic ~64x. Timings this small on a shared machine are noisy,
    # hence the wide margin, and under 0.1 s nothing can be wrong enough to matter.
    assert large < 0.1 or large / small < 20, f"{name}: {small * 1e3:.1f} ms -> {large * 1e3:.1f} ms"
    assert large < 2.0, f"{name}: 32 KB took {large:.2f} s"


def test_a_long_line_piped_from_echo_is_redacted_in_linear_time() -> None:
    """A review (session 22): after `echo x |`, each `login` of the line scanned the rest of it for
    `--password-stdin` (64 KiB of JSON auth events: 5 s per field, again in every later call)."""
    redactor = Redactor()
    redactor.redact_text("warm up: password='hunter2'")
    small_text, large_text = (
        "echo ok | tee out.json " + json.dumps({"auth": "sso", "kinds": ["login"] * n}) for n in (400, 3_200)
    )
    small, large = best_times([lambda: redactor._builtin(small_text), lambda: redactor._builtin(large_text)])
    assert large < 0.1 or large / small < 20, f"{small * 1e3:.1f} ms -> {large * 1e3:.1f} ms"
    assert "[REDACTED" in redactor.redact_text("echo 'S3cr3t-pw' | docker login -u bob --password-stdin")


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
    assert properties["api_key"] == {"type": "string", "default": "[REDACTED:api_key]"}
    # A secret-named parameter's offered values are secrets (a QA pass, session 20): `enum` stays a list.
    password = "Def" + rand(14)
    offered = {
        "type": "object",
        "properties": {
            "password": {"type": "string", "default": password, "examples": [password]},
            "token": {"type": "string", "enum": [password, ""]},
            "mode": {"type": "string", "default": "fast"},
        },
    }
    out = Redactor().redact(offered)
    assert_gone(password, json.dumps(out))
    assert out["properties"]["token"]["enum"] == ["[REDACTED:token]", ""]
    assert out["properties"]["mode"] == {"type": "string", "default": "fast"}
    capped, _ = Redactor().redact_capped(offered, 10_000)
    assert capped == out
    # Not a schema: a plain dict under "properties" keeps its keys' meaning.
    assert Redactor().redact({"properties": {"password": "hunter2"}}) == {
        "properties": {"password": "[REDACTED:password]"}
    }


def test_detect_secrets_skips_what_the_rules_already_redacted() -> None:
    from honed.redaction._textmatch import lower
    from honed.redaction.secret_scan import candidate_spans

    done = "password = '[REDACTED:password]' and PWD='[REDACTED:password]';"
    assert candidate_spans(done, lower(done)) == []
    todo = "secrets = 'abc123xyz'"
    assert candidate_spans(todo, lower(todo)) == [(0, len(todo))]


# --- Secrets named by a sibling, in command lines, URLs and bytes (security review, 2026-05) ---------

ENV_SECRET = "Hunter2Env" + rand(12)
PAIR_SECRET = rand(24)

NAMED_BY_A_SIBLING = {
    "kubernetes_env": {"env": [{"name": "DB_PASSWORD", "value": ENV_SECRET}]},
    "kubernetes_env_api_key": {"env": [{"name": "OPENAI_API_KEY", "value": ENV_SECRET}]},
    "key_value_entry": {"settings": [{"key": "smtp_pass", "value": ENV_SECRET}]},
    "aws_tags": {"Tags": [{"Key": "ClientSecret", "Value": ENV_SECRET}]},
    "header_pairs": {"headers": [["X-Api-Key", PAIR_SECRET], ["Accept", "*/*"]]},
    "header_pair_tuples": {"headers": [("Authorization", PAIR_SECRET)]},
    "pairs_at_top": [["password", ENV_SECRET]],
}


@pytest.mark.parametrize("name", sorted(NAMED_BY_A_SIBLING))
def test_a_value_named_by_its_sibling_is_redacted(name: str) -> None:
    """`[{"name": "DB_PASSWORD", "value": ...}]` and `[["X-Api-Key", ...]]` reached the store: the
    secret's name was a sibling string, not its dict key."""
    value = NAMED_BY_A_SIBLING[name]
    for out in (Redactor().redact(value), Serializer(redactor=Redactor()).field(value)):
        text = json.dumps(out)
        assert "[REDACTED:" in text
        assert_gone(ENV_SECRET, text)
        assert_gone(PAIR_SECRET, text)


NAMED_IN_TEXT = [
    "{{'pod_env': [{{'name': 'DB_PASSWORD', 'value': '{}'}}]}}",
    '{{"env": [{{"name": "SMTP_PASS", "value": "{}"}}]}}',
    'V1EnvVar(name="DB_PASS", value="{}")',
    "{{'request_headers': [['Accept', '*/*'], ['X-Api-Key', '{}']]}}",
    '[("user", "bob"), ("auth", "{}")]',
]


@pytest.mark.parametrize("template", NAMED_IN_TEXT)
def test_a_value_named_by_its_sibling_in_text_is_redacted(template: str) -> None:
    """A tool's dict result reaches the model (and the store) as its repr: the same entries, as text."""
    out = Redactor().redact_text(template.format(ENV_SECRET))
    assert "[REDACTED:" in out
    assert_gone(ENV_SECRET, out)


def test_values_named_by_ordinary_siblings_are_kept() -> None:
    value = {
        "env": [{"name": "LOG_LEVEL", "value": "debug"}, {"name": "DB_PASSWORD", "valueFrom": {"ref": "db"}}],
        "headers": [["Content-Type", "application/json"], ["X-Api-Key", ""]],
        "messages": [("user", "reset my password"), ("assistant", "done")],
        "tally": [["pass", 3], ["fail", 1]],
        "schema": {"type": "object", "required": ["password", "username"]},
        "args": ["token", "ization"],
    }
    assert Redactor().redact(value) == json.loads(json.dumps(value))
    assert Serializer(redactor=Redactor()).field(value) == json.loads(json.dumps(value))


def test_keys_named_pass_or_bearer_hide_their_text() -> None:
    out = Redactor().redact({"pass": ENV_SECRET, "DB_PASS": ENV_SECRET, "bearer": PAIR_SECRET})
    assert all(v.startswith("[REDACTED:") for v in out.values()), out
    # A tally or a verdict under "pass" is not a password.
    kept = {"pass": 3, "fail": 1, "passed": "yes", "checks": {"pass": True}, "verdict": {"pass": "yes"}}
    assert Redactor().redact(kept) == kept


CLI_PASSWORD = "Hunter2Cli" + rand(8)
COMMAND_LINES = {
    "curl_user": "curl -u admin:{} https://api.example.com/v1/x",
    "curl_long_user": "curl --user 'admin:{}' https://api.example.com",
    "mysql_password_flag": "mysql -u root --password {} shop",
    "wget_password_flag": "wget --user bob --password={} https://x/y",
    "mysql_attached_p": "mysql -u root -p{} shop",
    "mysqldump_attached_p": "mysqldump -uroot -p'{}' shop > dump.sql",
    "sshpass_quoted": "sshpass -p '{}' ssh root@host uptime",
    "sshpass_bare": "sshpass -p {} scp a host:b",
    "docker_login": "docker login -u bob -p {} registry.example.com",
    "netrc": "machine api.example.com login bob password {}",
    "netrc_lines": "machine api.example.com\n  login bob\n  password {}\n",
    # A QA pass (session 19, an attacker): each of these reached the store whole.
    "redis_cli": "redis-cli -h cache -a {} ping",
    "mongosh": "mongosh mongodb://db -u admin -p {} --eval 1",
    "sqlcmd": "sqlcmd -S db -U sa -P {} -Q 'select 1'",
    "ldapsearch": "ldapsearch -x -D cn=admin -w {} -b dc=x",
    "openssl_pass": "openssl pkcs12 -export -in c.pem -out c.p12 -passout pass:{}",
    "keytool": "keytool -list -keystore k.jks -storepass {}",
    "zip": "zip -P {} a.zip f",
    "seven_zip": "7z a -p{} a.7z f",
    "smbclient": "smbclient //h/s -U user%{}",
    "sudo_stdin": "echo {} | sudo -S apt update",
    "plink": "plink -pw {} host",
}


@pytest.mark.parametrize("name", sorted(COMMAND_LINES))
def test_passwords_on_command_lines_are_redacted(name: str) -> None:
    """`curl -u admin:PASS`, `mysql -pPASS`, `sshpass -p 'PASS'`, netrc `password PASS` reached the store."""
    out = Serializer(redactor=Redactor()).field({"cmd": COMMAND_LINES[name].format(CLI_PASSWORD)})
    assert "[REDACTED:password]" in out["cmd"]
    assert_gone(CLI_PASSWORD, out["cmd"])


URL_TOKEN = rand(10, string.ascii_lowercase) + rand(10, string.digits)
OTHER_SHAPES = {
    # An attacker's QA pass, session 21: each of these reached the store and the exports.
    "env_vendor_key": ("Sg" + rand(22), "HOME=/root\nSENDGRID_KEY={}\nPATH=/usr/bin"),
    "env_rails_secret_key_base": ("Rb" + rand(22), "SECRET_KEY_BASE={}"),
    "env_master_key": (rand(32, "0123456789abcdef"), "RAILS_MASTER_KEY={}"),
    "mailgun_key": (rand(32, "0123456789abcdef"), "MAILGUN_API=key-{}"),
    "npmrc_auth": (
        base64.b64encode(b"bob:Np" + rand(14).encode()).decode(),
        "//registry.npmjs.org/:_auth={}",
    ),
    "httpie_auth": ("Ht" + rand(14), "http -a bob:{} POST api.example.com"),
    "httpie_auth_long": ("Ht" + rand(14), "https --auth bob:{} GET api.example.com"),
    "sqlplus": ("Sq" + rand(14), "sqlplus system/{}@//db:1521/ORCL"),
    "sentence_password": ("Pw" + rand(10) + "7", "the password is {}."),
    "sentence_api_key": ("Ak" + rand(14) + "3", "Your API key: {}"),
    "sentence_token": ("Tk" + rand(14) + "5", "your access token is {}"),
    "query_key": ("AIz" + rand(20), "https://maps.example.com/geocode/json?address=x&key={}"),
    "query_signature": ("Sig" + rand(20) + "9", "https://api.example.com/v1?signature={}"),
    "openssl_k": ("Os" + rand(14), "openssl enc -aes-256-cbc -k {} -in f"),
    "openssl_passwd": ("Op" + rand(14), "useradd -p $(openssl passwd -1 {}) bob"),
    "htpasswd": ("Hp" + rand(14), "htpasswd -bc /etc/nginx/.htpasswd admin {}"),
    "chpasswd": ("Cp" + rand(14), "echo 'root:{}' | chpasswd"),
    "docker_login_stdin": ("Dl" + rand(14), "echo {} | docker login -u bob --password-stdin"),
    "gh_with_token": ("Gh" + rand(14), "echo {} | gh auth login --with-token"),
    "rdp": ("Rd" + rand(14), "xfreerdp /u:admin /p:{} /v:host"),
    "js_pass": ("Js" + rand(14), "auth: {{ user: 'bob', pass: '{}' }}"),
    "terraform_default": ("Tf" + rand(14), 'variable "db_password" {{\n  default = "{}"\n}}'),
    # A second review (session 21): what shape checks of the first fixes let through.
    "sentence_passphrase_hyphens": (
        "correct-horse-" + rand(8, string.ascii_lowercase) + "-staple",
        "the passphrase is {}",
    ),
    "sentence_password_paren": ("aB3(dE6f" + rand(6), "the password is {}"),
    "django_secret_key": (
        "-kj64pjb81c0acv$0^b2j56ep_1+(7t1f=3q3nkz#4lbei" + rand(4, "abc123"),
        "SECRET_KEY = '{}'",
    ),
    "signing_key_words": ("the-signing-key-" + rand(6, string.ascii_lowercase), "SIGNING_KEY={}"),
    "sql_insert": ("Si" + rand(14), "INSERT INTO users(name, password) VALUES ('bob', '{}')"),
    # A review (session 22): one step past those.
    "sqlplus_flags": ("Sq" + rand(14), "sqlplus -s -L scott/{}@orcl @script.sql"),
    "printf_login": ("Pl" + rand(14), "printf '{}' | docker login -u bob --password-stdin registry.io"),
    "echo_n_login": ("En" + rand(14), "echo -n '{}' | docker login -u bob --password-stdin"),
    "here_string_login": ("Hs" + rand(14), "docker login -u bob --password-stdin <<< '{}'"),
    "httpie_auth_equals": ("He" + rand(14), "http --auth=bob:{} GET example.org"),
    "sentence_was": ("Pw" + rand(10) + "8", "The password was {}"),
    "sentence_set_to": ("Pw" + rand(10) + "9", "I set the password to {} for you."),
    # A fourth review (session 22): values cut at a bracket, and mixed-case letters, that are secrets.
    "django_key_unquoted": ("8c#(v0k@m2x*l5q!w9e(r7t^y3u6i1o4p" + rand(4), "DJANGO_SECRET_KEY={}"),
    "bracketed_key_unquoted": ("sk[live]9f8e7d6c" + rand(12, "0123456789abcdef"), "API_KEY={}"),
    "mixed_case_letters_password": ("HELLOworldAGAIN", "the password is {}"),
    # A second review (session 22): what the exclusions of the first review's fixes let through.
    "key_starting_with_a_slash": ("/kq3Zr8Pw+vT2mN9" + rand(12), "SECRET_KEY={}"),
    "sentence_key_with_a_slash": ("/9j4KqzT8vW2nR5s" + rand(4), "your api key: {}"),
    "caps_words_key": ("K9D2_PQ7Z_X4M1_" + rand(4, string.ascii_uppercase), "ENCRYPTION_KEY={}"),
    "env_words_secret": ("supersecret" + rand(8, string.ascii_lowercase), "SECRET_KEY={}"),
    "rdp_continued": ("Rd" + rand(14), "xfreerdp /v:10.0.0.5 \\\n  /u:admin \\\n  /p:{} \\\n  /cert:ignore"),
    "rdp_argv": ("Rd" + rand(14), "rdp_cmd = ['xfreerdp', '/u:admin', '/p:{}', '/v:host']"),
    "terraform_numeric": (rand(10, string.digits), 'variable "db_password" {{\n  default = "{}"\n}}'),
    # A QA pass, session 20: a lowercase `_pass` name, and a passphrase's words after the first.
    "lowercase_db_pass": ("Lc" + rand(14), "db_pass={} ./migrate"),
    "lowercase_smtp_pass_colon": ("Sm" + rand(14), "smtp_pass: {}"),
    "passphrase_of_words": (
        "horse " + rand(8, string.ascii_lowercase) + " staple",
        "passphrase: correct {}\nnext",
    ),
    "passphrase_of_words_assigned": (
        "battery " + rand(8, string.ascii_lowercase),
        "GPG_PASSPHRASE=correct {}",
    ),
    "url_token": (URL_TOKEN, "git remote add origin https://{}@github.com/acme/app.git"),
    "url_token_http": (URL_TOKEN, "GET http://{}@10.0.0.2:8080/metrics"),
    "aws_secret_after_a_space": (AWS_SECRET, "aws_secret_access_key {}"),
    "aws_secret_beside_its_key_id": (AWS_SECRET, "the key pair is AKIAIOSFODNN7EXAMPL3 / {}"),
    "aws_credentials_csv": (
        AWS_SECRET,
        "User name,Access key ID,Secret access key\nbob,AKIAIOSFODNN7EXAMPL3,{}\n",
    ),
    "bearer_letters_only": (rand(19, string.ascii_letters), "use Bearer {} now"),
    "openai_key_url_encoded": ("abcdefghij" + rand(20), "https://x/?api_key%3Dsk%2D{}&q=1"),
    "openai_key_url_encoded_alone": ("abcdefghij" + rand(20), "https://x/?k=sk%2Dproj%2D{}"),
    # What an attacker found in session 14: a percent-escape before a key, credentials in an
    # encoded URL, XML elements and attributes, a Kubernetes env entry, vendor tokens by shape.
    "openai_key_after_an_escaped_space": (
        "abcdefghij" + rand(30),
        "GET /search?q=my%20key%20sk-proj-{} HTTP/1.1",
    ),
    "anthropic_key_after_an_escaped_quote": (rand(40), "body=%7B%22key%22%3A%22sk-ant-api03-{}%22%7D"),
    "aws_key_after_an_escaped_colon": ("AKIA" + rand(16, string.ascii_uppercase), "creds=x%3A{}"),
    "password_in_an_encoded_url": (
        "Pct" + rand(12),
        "https://app/cb?next=postgres%3A%2F%2Fadmin%3A{}%40db%2Fprod",
    ),
    "xml_password_element": (
        "Xml" + rand(12),
        "<server><username>ci</username><password>{}</password></server>",
    ),
    "xml_api_key_element": (rand(20), "<config><apiKey>{}</apiKey></config>"),
    "xml_name_value_attributes": ("Att" + rand(10), '<add key="DbPassword" value="{}"/>'),
    "kubernetes_env_entry": ("Yaml" + rand(10), "env:\n  - name: DB_PASSWORD\n    value: {}\n"),
    "twilio_api_key": (rand(32, "0123456789abcdef"), "twilio SK{}"),
    "telegram_bot_token": ("AA" + rand(33), "bot 1234567890:{}"),
    "mailchimp_key": (rand(32, "0123456789abcdef") + "-us12", "mc {}"),
    "discord_bot_token": ("MTA4MzA1NzM2NTQ0NjIwNDQxNg.GhYt8v." + rand(38), "{}"),
    # A QA pass (session 19, an attacker): a name that redacts as a dict key, written as text.
    "env_style_pass": ("Env" + rand(12), "DB_PASS={}\nSMTP_PASS: x"),
    "yaml_style_pass": ("Yml" + rand(12), "smtp:\n  SMTP_PASS: {}\n"),
    "docker_config_auth": (rand(24), '{{"auths": {{"ghcr.io": {{"auth": "{}"}}}}}}'),
    "requests_auth_tuple": ("Req" + rand(12), "requests.get(url, auth=('admin', '{}'))"),
    "basic_auth_object": ("Obj" + rand(12), 'HTTPBasicAuth("admin", "{}")'),
    # A QA pass (session 20, an attacker): values past `& , ; )`, holding the other quote or an
    # escaped one, and SQL's `PASSWORD '...'` forms kept the password whole or its tail.
    "env_value_with_an_ampersand": ("Tr0ub4dor&Alpha" + rand(8), "DB_PASSWORD={}"),
    "value_with_a_comma": ("hunter2,Bravo" + rand(8), "password={}"),
    "value_with_a_semicolon": ("pa55;Charlie" + rand(8), "password: {}"),
    "value_with_a_parenthesis": ("s3cr)Delta" + rand(8), "SECRET_KEY={}"),
    "quoted_value_with_the_other_quote": ("it's-Echo" + rand(8), 'password = "{}"'),
    "json_value_with_an_escaped_quote": ('ab\\"Foxtrot' + rand(8), '{{"password": "{}"}}'),
    "python_unicode_literal": ("Uni" + rand(10), "password = u'{}'"),
    "postgres_alter_user": ("Hotel" + rand(8), "ALTER USER app WITH ENCRYPTED PASSWORD '{}'"),
    "postgres_create_role": ("India" + rand(8), "CREATE ROLE app LOGIN PASSWORD '{}'"),
    "mysql_set_password": ("Juliet" + rand(8), "SET PASSWORD FOR 'bob'@'%' = '{}'"),
    "mysql_password_function": ("Fn" + rand(10), "SET PASSWORD = PASSWORD('{}')"),
    # `kubectl get secret -o json|yaml`: every value under `data` is a secret, base64 or not.
    "kubernetes_secret_json": (
        rand(40),
        '{{\n  "apiVersion": "v1",\n  "data": {{\n    ".env": "{}"\n  }},\n  "kind": "Secret"\n}}',
    ),
    "kubernetes_secret_yaml": (rand(40), "apiVersion: v1\ndata:\n  .env: {}\nkind: Secret\ntype: Opaque\n"),
}


ARGV_PASSWORD = "Argv" + rand(12)
ARGVS = {
    "mysql_attached_p": ["mysql", "-u", "root", f"-p{ARGV_PASSWORD}", "-e", "select 1"],
    "password_flag": ["wget", "--password", ARGV_PASSWORD, "https://x/y"],
    "curl_user": ["curl", "-u", f"bob:{ARGV_PASSWORD}", "https://api.example.com"],
    "sshpass": ["sshpass", "-p", ARGV_PASSWORD, "ssh", "root@host", "uptime"],
    "redis_cli": ["redis-cli", "-a", ARGV_PASSWORD, "ping"],
}


def test_a_query_strings_next_parameter_is_not_the_password() -> None:
    """A value runs past `&` (`DB_PASSWORD=a&b`), but not into a query string's next `name=`."""
    text = "GET /reset?password=abc123xyz&user=bob&next=/home; token=tok_9f8e7d6c5b4a3,expires=3600"
    assert Redactor().redact_text(text) == (
        "GET /reset?password=[REDACTED:password]&user=bob&next=/home; token=[REDACTED:token],expires=3600"
    )


def test_a_kubernetes_secret_as_an_object_is_redacted() -> None:
    """A QA pass (session 19): the Kubernetes client's `V1Secret.to_dict()` (or a parsed manifest) as a
    tool's result kept every value of `data` whose key names no secret (`.env`, `config.json`)."""
    env, docker = rand(40), "dXNlcjpwYXNz" + rand(20)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "app-env", "namespace": "prod"},
        "data": {".env": env, ".dockerconfigjson": docker},
        "stringData": {"settings.ini": "[db]\nhost = x"},
        "type": "Opaque",
    }
    for out in (
        Redactor().redact({"result": secret}),
        Redactor().redact_capped({"result": secret}, 10_000)[0],
        Serializer(redactor=Redactor()).field({"result": secret}),
        Serializer(redactor=Redactor()).field({"items": [secret]}),
    ):
        text = json.dumps(out)
        assert_gone(env, text)
        assert_gone(docker, text)
        assert "host = x" not in text and "app-env" in text and ".env" in text
    config_map = {"kind": "ConfigMap", "data": {"color": "blue"}}
    assert Serializer(redactor=Redactor()).field({"result": config_map}) == {"result": config_map}


@pytest.mark.parametrize("name", sorted(ARGVS))
def test_passwords_in_an_argv_list_are_redacted(name: str) -> None:
    """A QA pass (session 16): the command as one string was redacted, the same command as a
    `subprocess.run` argv list (a tool's arguments) reached the store whole."""
    argv = ARGVS[name]
    out = Serializer(redactor=Redactor()).field({"cmd": argv})
    assert "[REDACTED:password]" in " ".join(out["cmd"]) and out["cmd"][0] == argv[0]
    assert_gone(ARGV_PASSWORD, json.dumps(out))
    assert Redactor().redact(argv) == out["cmd"]
    kept = ["docker", "run", "-p", "8080:80", "-u", "1000:1000", "nginx"]  # not passwords
    assert Serializer(redactor=Redactor()).field({"cmd": kept})["cmd"] == kept


@pytest.mark.parametrize("name", sorted(OTHER_SHAPES))
def test_tokens_in_urls_and_loose_assignments_are_redacted(name: str) -> None:
    """A token as URL userinfo, `aws_secret_access_key <value>`, `Bearer <letters>`, `sk%2D...`."""
    secret, template = OTHER_SHAPES[name]
    out = Redactor().redact_text(template.format(secret))
    assert "[REDACTED:" in out
    assert_gone(secret, out)


ORDINARY = [
    "Send the password reset instructions to user@example.com before noon.",
    "Password reset instructions were sent; the login page shows them.",
    "docker run -p 8080:80 -p 443:443 nginx",
    "docker run -u 1000:1000 -v /data:/data img",
    'docker run -u "$(id -u):$(id -g)" img',
    "ssh -p 2222 deploy@host && mkdir -p /tmp/x",
    "mysql -u root -p shop",
    "mysql -h db -P 3306 -u root --password --database shop",
    "ls -a /tmp && grep -w foo x && git commit -a -m wip",
    "apiVersion: v1\ndata:\n  color: blue\nkind: ConfigMap\n",
    "The password reset link expires; auth, token and key rotation happen nightly.",
    "if first_pass == 3: test_pass = True  # bypass=1, compass: north, auth: required, OAuth author",
    "echo hello | sudo tee /etc/motd && echo $PW | sudo -S ls",
    'curl -u "$API_USER:$API_PASS" https://api.example.com',
    "echo $TOKEN | docker login -u bob --password-stdin ghcr.io",
    "git clone https://github.com/acme/app.git && git clone ssh://git@github.com/acme/app.git",
    "git clone https://bob@bitbucket.org/acme/app.git",
    "mail user@example.com or first.last2024@example.org",
    "Use Bearer authentication; the bearer of bad news is not to blame.",
    "aws_secret_access_key is missing from the environment",
    "commit 0123456789abcdef0123456789abcdef01234567 fixed the AKIA check",
    "Ask sk-learn users; the %2D escape is a dash.",
    '{"type": "object", "required": ["password", "username"]}',
    "{'name': 'LOG_LEVEL', 'value': 'debug'}, [['Content-Type', 'text/plain']]",
    "All tests passed; the author is bob, see [('pass', 'yes'), ('fail', 'no')].",
    "Done. Next step. MTA is fine; use the SK for Skype.",
    "<name>bob</name><key>ordinary</key><secretary>Ann</secretary>",
    "env:\n  - name: LOG_LEVEL\n    value: debug\n",
    "GET /q?x=a%20b%20c&next=https%3A%2F%2Fexample.com%2Fpath",
    "mycli --api-key $API_KEY --token-file ~/.token; pass --secret name to pick one",
    "the signature=valid and sig=ok; ya29 is a model name, hvs.short too",
    "The password is incorrect. Your token: expired; the secret is out; api key: missing",
    "PRIMARY_KEY=id SORT_KEY=created_at PUBLIC_KEY=ssh-ed25519 https://x/?key=name&sig=short",
    "INSERT INTO t (a, b) VALUES (1, 'two'); INSERT INTO users (name, password) VALUES ('bob', NULL)",
    'variable "region" {\n  default = "us-east-1"\n}\nhttp -a bob GET x; openssl enc -d -in f',
    "a8f5f167f44f4964e6c998dee827110c0123456789abcdef and iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk",
    "Zm9yIHRoZSByZWNvcmQsIHRoaXMgaXMgcGxhaW4gdGV4dCB3aXRoIG5vIHNlY3JldHM=",
    # A review of the session's rules (session 21): code and ML text they erased.
    "forward_pass = model(x)\nrender_pass = 'shadow_map'\nconst STORAGE_KEY = 'todos-vuejs'",
    'FEATURE_KEY = "dark_mode"; STATE_KEY = "messages"; REDIS_KEY = f"user:{uid}"',
    "The eos token is <|endoftext|>. bos token: <|im_start|>",
    "https://cdn.example.com/page?key=homepage_banner_2024",
    "STRIPE_KEY=${STRIPE_KEY} MAPBOX_KEY=${MAPBOX_KEY:-} THEME_KEY = 'dark-mode-2024' I18N_KEY = 'home.banner.title'",
    # A review of those fixes (session 22): builds, links, paths, names, dates and prose they erased.
    "dotnet build /p:Configuration=Release /p:Version=1.2.3; msbuild MyApp.sln /t:Build /p:Platform=x64",
    "Get your API key: https://platform.openai.com/api-keys\nSet your API key: OPENAI_API_KEY",
    "the secret is 2024-12-31T00:00:00Z",
    "You can use openssl passwd to create a password hash. Use htpasswd -b to set the password from a shell.",
    'variable "enable_auth" {\n  type = string\n  default = "true"\n}',
    "SSH_KEY=~/.ssh/id_ed25519 DEPLOY_KEY=/etc/deploy/key.pem APP_KEY='main'",
    "SIGNING_KEY = settings.JWT_SIGNING_KEY\nBLOB_KEY = 'Models/Llama3/Checkpoint0001.bin'",
    # A third review (session 22): code and names the second round's rules erased.
    "OPENAI_KEY = os.environ[\"OPENAI_KEY\"]\nSTRIPE_KEY = config['stripe']['key']\nOPENAI_KEY = cfg.openai[0]",
    "Pass the API key to OpenAIEmbeddings. Store the password to MySQLDatabase. token: GitHubGraphQL",
    "render_pass = MTLRenderPassDescriptor\nbloom_pass: UnrealBloomPassHDR",
    # What session 24's rules (one-time codes, PINs, .pgpass lines, crypt hashes, passphrases) must leave.
    "The password is: not set. The passphrase is: too short, try again.",
    "le mot de passe est incorrect; pass: true\npass: 3\nbypass: enabled",
    "uptime 12:30:45:00:05\naa:bb:cc:dd:ee:ff\nlocalhost:5432:postgres",
    "It costs $1$ or $5 each; see $HOME/$USER and the $2 column",
    '{"status_code": "200", "error_code": "E42", "zip_code": "10115", "promo_code": "WINTER2024"}',
    "{'pin': {'lat': 48.1, 'lng': 11.5}, 'otp': 'yes'} and the secret sauce is AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
]


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_commands_and_prose_are_left_alone(text: str) -> None:
    assert Redactor().redact_text(text) == text


ENV_FILE_KEY = "sk-proj-" + rand(40)


def test_base64_text_holding_a_secret_is_redacted_and_stays_base64() -> None:
    """An attacker's QA pass (session 21): a `.env` read through GitHub's contents API (base64, broken
    every 60 characters) reached the store and the exports whole, and decoded to the key."""
    env = f"OPENAI_API_KEY={ENV_FILE_KEY}\nDATABASE_URL=postgres://app:Pg{rand(14)}@db/prod\n".encode()
    encoded = base64.encodebytes(env).decode()  # lines of 76, as GitHub's 60
    result = {"name": ".env", "encoding": "base64", "content": encoded}
    out = Redactor().redact(result)
    decoded = base64.b64decode(out["content"]).decode()
    assert_gone(ENV_FILE_KEY, decoded)
    assert "[REDACTED:" in decoded and decoded.startswith("OPENAI_API_KEY=")
    assert out["name"] == ".env"
    # As JSON text (a tool's string result): the escaped `\n` breaks too.
    text = Redactor().redact_text(json.dumps(result))
    assert ENV_FILE_KEY not in base64.b64decode(json.loads(text)["content"]).decode()
    # After `=` (an environment variable, a query), and an unpadded run whose next line's first
    # word the run took in (a review, session 21: both kept whole).
    url = f"postgres://app:Pg{rand(14)}@db/prod".encode()
    for template in ("CONFIG_B64={}", "GET /import?payload={}", "$ cat creds.b64\n{}\nDone\n"):
        encoded_url = base64.b64encode(url + b"1" * (-len(url) % 3 + 1)).decode().rstrip("=")
        out = Redactor().redact_text(template.format(encoded_url))
        assert encoded_url not in out, template
    # Wrapped and indented, as a YAML block scalar holds it (a review, session 22: each line was
    # decoded on its own, and a secret across a break was kept, whole or in part).
    encoded = base64.b64encode(env).decode()
    for width in (40, 60, 76):
        lines = [encoded[i : i + width] for i in range(0, len(encoded), width)]
        out = Redactor().redact_text("data: |\n" + "\n".join("    " + line for line in lines))
        packed = "".join(line.strip() for line in out.splitlines()[1:])
        decoded = base64.b64decode(packed + "=" * (-len(packed) % 4)).decode()
        assert ENV_FILE_KEY[-12:] not in decoded and "[REDACTED:" in decoded, width
    # Many short runs are redacted together: a field of 2,000 costs what its decoded text does.
    chunk = base64.b64encode(b"mysql -u root -pHunter22").decode()
    field = " ".join([chunk] * 2000)
    started = time.perf_counter()
    out = Redactor().redact_text(field)
    assert chunk not in out and time.perf_counter() - started < 1.0
    # Binary data and base64 of ordinary text are kept as they are.
    png = base64.b64encode(bytes(range(256)) * 4).decode()
    plain = base64.b64encode(b"nothing to hide in this file, just words and numbers 12345").decode()
    assert Redactor().redact_text(png) == png and Redactor().redact_text(plain) == plain


def test_environment_key_names_name_secrets_as_dict_keys() -> None:
    """`<NAME>_KEY` in an environment (upper case), `<vendor>_key` in any case; a primary or
    public key is not a secret."""
    secret = "Ek" + rand(20)
    env = {n: secret for n in ("SENDGRID_KEY", "APP_KEY", "OPENAI_KEY", "stripe_key", "SECRET_KEY_BASE")}
    assert_gone(secret, json.dumps(Redactor().redact(env)))
    kept = {"primary_key": "id", "PUBLIC_KEY": "ssh-ed25519 AAAA", "cache_key": "u:1", "key": "name",
            "TABLE_KEY": "orders", "STATE_KEY": "messages", "storage_key": "todos"}  # fmt: skip
    assert Redactor().redact(kept) == kept
    # A secret-named parameter's offered modes are not secrets (a review, session 21).
    schema = {"type": "object", "properties": {"auth": {"type": "string", "enum": ["oauth2", "basic", "none"],
              "default": "oauth2"}, "pass": {"enum": ["first", "second"]}}}  # fmt: skip
    assert Redactor().redact(schema) == schema


@pytest.mark.parametrize("data", [bytes, bytearray, memoryview])
def test_text_bytes_are_redacted_before_they_are_encoded(data: Callable[[bytes], Any]) -> None:
    """A node returning the bytes of a `.env` file stored them as base64: no rule could see the key."""
    env = f"OPENAI_API_KEY={ENV_FILE_KEY}\nDB_PASSWORD=Hunter2Secret\nDEBUG=1\n".encode()
    out = Serializer(redactor=Redactor()).field({"data": data(env)})
    decoded = base64.b64decode(out["data"]["base64"]).decode()
    assert_gone(ENV_FILE_KEY, decoded)
    assert_gone("Hunter2Secret", decoded)
    assert "DEBUG=1" in decoded and out["data"]["size"] == len(env)
    assert base64.b64encode(env).decode()[24:72] not in json.dumps(out)  # the key, encoded


def test_binary_and_plain_bytes_are_kept() -> None:
    for data in (bytes(range(256)) * 20, b"hello world, no secrets here", b"\x00\x01hello"):
        plain = Serializer().field(data)
        assert Serializer(redactor=Redactor()).field(data) == plain


def test_sibling_named_secrets_cli_passwords_and_bytes_never_reach_the_store(
    sqlite_url: str, tmp_path: Path
) -> None:
    from langchain_core.tools import tool

    @tool
    def shell(cmd: str) -> dict[str, Any]:
        """Run a shell command."""
        return {
            "pod_env": [{"name": "DB_PASSWORD", "value": ENV_SECRET}],
            "request_headers": [["X-Api-Key", PAIR_SECRET]],
            "dotenv_file": f"OPENAI_API_KEY={ENV_FILE_KEY}\n".encode(),
            "remote": f"https://{URL_TOKEN}@github.com/acme/app.git",
        }

    cmd = f"curl -u admin:{CLI_PASSWORD} https://api.example.com/v1/x"
    capture = honed.Middleware(store=sqlite_url)
    agent = create_agent(ToolScriptModel(), [shell], name="ops", middleware=[capture])
    agent.invoke({"messages": [("user", "call shell " + json.dumps({"cmd": cmd}) + "; answer done")]})
    assert honed.flush()

    everything = stored_everything(sqlite_url, tmp_path / "spool")
    for secret in [ENV_SECRET, PAIR_SECRET, ENV_FILE_KEY, URL_TOKEN, CLI_PASSWORD]:
        assert_gone(secret, everything)
    assert base64.b64encode(f"OPENAI_API_KEY={ENV_FILE_KEY}\n".encode()).decode()[24:56] not in everything
    t = honed.open_store(sqlite_url).trajectories(limit=5)[0]
    assert [s.name for s in t.tool_steps()] == ["shell"]


def test_bytes_in_langgraph_state_never_reach_the_store(sqlite_url: str, tmp_path: Path) -> None:
    from typing import TypedDict

    from langgraph.graph import END, START, StateGraph

    env = f"OPENAI_API_KEY={ENV_FILE_KEY}\nDB_PASSWORD=Hunter2Secret\n".encode()

    class State(TypedDict):
        path: str
        data: bytes

    def read(state: State) -> dict[str, Any]:
        return {"data": env}  # open(".env", "rb").read()

    graph = StateGraph(State)
    graph.add_node("read", read)
    graph.add_edge(START, "read")
    graph.add_edge("read", END)
    app = honed.wrap(graph.compile(), store=sqlite_url)
    app.invoke({"path": ".env", "data": b""})
    assert honed.flush()

    everything = stored_everything(sqlite_url, tmp_path / "spool")
    assert_gone(ENV_FILE_KEY, everything)
    assert base64.b64encode(env).decode()[24:56] not in everything
    t = honed.open_store(sqlite_url).trajectories(limit=1)[0]
    assert "[REDACTED:" in base64.b64decode(t.output["data"]["base64"]).decode()


# A QA pass, session 23: each of these kept its secret.
FORM_PASSWORD = "Tr0ub4dor&3" + rand(10)
SECOND_LEVEL = {
    "a sign-up form's confirmation": {
        "user": {"password": FORM_PASSWORD, "password_confirmation": FORM_PASSWORD}
    },
    "Django's numbered copies": {"username": "bob", "password1": FORM_PASSWORD, "password2": FORM_PASSWORD},
    "camelCase confirmation": {"passwordConfirm": FORM_PASSWORD, "password_again": FORM_PASSWORD},
    "a key's hex": {
        "private_key_hex": FORM_PASSWORD,
        "privKey": FORM_PASSWORD,
        "recovery_phrase": FORM_PASSWORD,
    },
    "other languages": {"passwort": FORM_PASSWORD, "contraseña": FORM_PASSWORD, "пароль": FORM_PASSWORD},
    "1Password's concealed field": {
        "fields": [
            {
                "id": "k3x",
                "type": "CONCEALED",
                "purpose": "PASSWORD",
                "label": "password",
                "value": FORM_PASSWORD,
            }
        ]
    },
    "AWS SSM's SecureString": {
        "Parameters": [{"Name": "/prod/x", "Type": "SecureString", "Value": FORM_PASSWORD}]
    },
}
TEXT_SHAPES = [
    "net user bob {} /add",
    "useradd -m -p {} bob",
    "vault login {}",
    "Password for bob: {}",
    "The new password is: {}",
    "your password has been reset to {}",
    "| user | password |\n|---|---|\n| bob | {} |",
    "name,password,role\nbob,{},admin",
    "aws configure set aws_secret_access_key {}",
    "git config --global user.password {}",
    # (a review, session 23: result tables of psql, MySQL and CSV, and other languages' words)
    "  user | password \n------+----------\n bob  | {} \n(1 row)",
    "+------+----------+\n| user | password |\n+------+----------+\n| bob  | {} |\n+------+----------+",
    '"user","password"\n"bob","{}"',
    "user;password\nbob;{}",
    "Benutzer,Kennwort\nbob,{}",
    "PASSWORT={}",
    "Das Passwort ist {}",
    "user=al&password_confirmation={}&x=1",
]


@pytest.mark.parametrize("name", sorted(SECOND_LEVEL))
def test_copies_numbered_and_vault_named_passwords_are_redacted(name: str) -> None:
    assert_gone(FORM_PASSWORD, json.dumps(Redactor().redact(SECOND_LEVEL[name]), ensure_ascii=False))


@pytest.mark.parametrize("shape", TEXT_SHAPES)
def test_passwords_in_commands_sentences_and_tables_are_redacted(shape: str) -> None:
    out = Redactor().redact_text(shape.format(FORM_PASSWORD))
    assert_gone(FORM_PASSWORD, out)
    assert "[REDACTED:" in out


def test_secrets_in_json_two_levels_deep_never_reach_the_store(sqlite_url: str, tmp_path: Path) -> None:
    """An SNS notification in an SQS message body: the app's event is JSON in JSON in JSON."""
    token = "wh-" + rand(24)
    event = {"type": "user.created", "user": {"password": FORM_PASSWORD}, "api_token": token}
    sns = {"Type": "Notification", "Message": json.dumps(event)}
    sqs = {"Messages": [{"MessageId": "q1", "Body": json.dumps(sns)}]}

    from langchain_core.tools import tool

    @tool
    def receive() -> str:
        """Read the queue."""
        return json.dumps(sqs)

    capture = honed.Middleware(store=sqlite_url)
    agent = create_agent(ToolScriptModel(), [receive], name="queue", middleware=[capture])
    agent.invoke({"messages": [("user", "call receive {}; answer done")]})
    assert honed.flush()
    everything = stored_everything(sqlite_url, tmp_path / "spool")
    assert_gone(FORM_PASSWORD, everything)
    assert_gone(token, everything)


@pytest.mark.parametrize(
    "text",
    [
        "config set max_tokens 5",
        "git config user.name bob",
        "user,token_count,role\nbob,3,admin",
        "| password_length | policy |\n|---|---|\n| 12 | strict |",
        "net user bob /delete",
    ],
)
def test_settings_and_tables_without_secrets_are_left_alone(text: str) -> None:
    assert Redactor().redact_text(text) == text


def test_names_and_ids_a_run_gives_are_redacted_at_rest(sqlite_url: str, tmp_path: Path) -> None:
    """A QA pass (session 23): a tool's name and call id (the model's reply chooses both), the
    provider's model name, the thread id and the task id were stored as they came, keys and all;
    the model step's own copy of the call id was redacted, so the two copies now agree."""
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, ChatResult

    from honed.testing import ScriptedChatModel

    keys = {f: f"sk-proj-{f.upper()}{rand(40)}" for f in ("tool", "call", "model", "thread", "task")}

    class Leaky(ScriptedChatModel):
        def _generate(
            self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any
        ) -> ChatResult:
            first = not any(isinstance(m, AIMessage) for m in messages)
            calls = [{"name": keys["tool"], "args": {}, "id": keys["call"]}] if first else []
            reply = AIMessage(content="" if first else "ok", tool_calls=calls)
            reply.response_metadata = {"model_name": keys["model"], "finish_reason": "stop"}
            return ChatResult(generations=[ChatGeneration(message=reply)])

    agent = create_agent(Leaky(), [], name="probe", middleware=[honed.Middleware(store=sqlite_url)])
    agent.invoke(
        {"messages": [("user", "go")]},
        config={
            "configurable": {"thread_id": keys["thread"]},
            "metadata": {"honed": {"task_id": keys["task"]}},
        },
    )
    assert honed.flush()
    everything = stored_everything(sqlite_url, tmp_path / "spool")
    for key in keys.values():
        assert_gone(key, everything)
    t = honed.open_store(sqlite_url).trajectories(limit=1)[0]
    tool = t.tool_steps()[0]
    assert tool.extra["tool_call_id"] == t.model_steps()[0].tool_calls[0]["id"] == "[REDACTED:openai_key]"


# A review (session 23) of the fixes above: each shape kept its secret, or lost ordinary text.
@pytest.mark.parametrize("name", sorted(SECOND_LEVEL))
def test_vault_and_qualified_secrets_as_json_text_are_redacted(name: str) -> None:
    """A tool's dict reaches the store as JSON text (LangChain's `ToolMessage` content)."""
    text = json.dumps(SECOND_LEVEL[name], ensure_ascii=False)
    assert_gone(FORM_PASSWORD, Redactor().redact_text(text))
    deep = json.dumps({"password": FORM_PASSWORD})
    for _ in range(5):
        deep = json.dumps({"body": deep})
    assert_gone(FORM_PASSWORD, Redactor().redact_text(deep))


@pytest.mark.parametrize(
    "value",
    [
        {
            "token_str": "Ġthe",
            "token_text": "the",
            "token_bytes": [116],
            "pass1": "ok",
            "password_check": "strong",
        },
        {"mnemonic": "mov", "op_str": "eax, 1"},
        {"label": "API key", "value": "Shown once after creation"},
        {"id": "password", "type": "password", "value": "Min 12 characters"},
        "| token | id |\n|---|---|\n| the | 1996 |",
        "| name | auth | secret |\n|---|---|---|\n| list | required | no |",
        "npm config set always-auth true",
        "kubectl config set-credentials bob",
        "config token limit",
    ],
)
def test_tokenizer_fields_settings_and_docs_tables_are_left_alone(value: Any) -> None:
    redacted = Redactor().redact_text(value) if isinstance(value, str) else Redactor().redact(value)
    assert redacted == value


def test_a_configure_line_of_many_flags_is_redacted_in_linear_time() -> None:
    """A review (session 23): the `config` rule retried `./configure --a --b ...` 2^n ways (22
    flags: 15 s, the capture writer stalled)."""
    line = "./configure " + "--enable-feature " * 60 + "\nchecking for keyutils.h... yes token"
    started = time.perf_counter()
    assert Redactor().redact_text(line) == line
    assert time.perf_counter() - started < 2.0  # exponential: days


def test_ids_at_rest_are_redacted_by_the_built_in_rules_not_the_hook(sqlite_url: str) -> None:
    """A review (session 23): the `redact=` hook rewrote task and thread ids (the README's own hook,
    `ACME-` -> `[customer]-`): the app found no runs by its ids, and a task held out by id trained."""
    from honed.learn.datasets import prepare

    hook = honed.Middleware(store=sqlite_url, redact=lambda s: s.replace("ACME-", "[customer]-"))
    agent = create_agent(ToolScriptModel(), [], name="desk", middleware=[hook])
    agent.invoke(
        {"messages": [("user", "answer ACME-7 is fine")]},
        {"configurable": {"thread_id": "ACME-42"}, "metadata": {"honed": {"task_id": "ACME-7"}}},
    )
    assert honed.flush()
    store = honed.open_store(sqlite_url)
    (t,) = store.trajectories(thread_id="ACME-42")
    assert t.task_id == "ACME-7" and "ACME-" not in json.dumps(t.task)
    store.add_verdict(t.id, honed.Verdict(passed=True, verifier="human"))
    assert prepare(store, "sft", heldout_tasks=["ACME-7"]).counts["rows"] == 0


def test_json_text_and_tables_are_redacted_once_in_linear_time_and_kept_readable() -> None:
    """A second review (session 23): a dashed line under a password header took 20 s (64 KiB); the
    hook ran twice on JSON text; a quoted CSV password holding `""` was kept; JSON text nested 600
    deep was stored as an error; prose with semicolons was read as a table."""
    started = time.perf_counter()
    line = "user,password\n" + "-" * 65_000 + "x\n"
    assert Redactor().redact_text(line) == line
    assert time.perf_counter() - started < 2.0  # quadratic: 20 s
    calls = []

    def hook(text: str) -> str:
        calls.append(text)
        return text.replace("ACME", "ACME (customer)")

    out = Redactor(hook).redact_text(
        json.dumps({"customer": "ACME", "value": "x", "password": FORM_PASSWORD})
    )
    assert "ACME (customer) (customer)" not in out and "ACME (customer)" in out and len(calls) == 1
    assert_gone(FORM_PASSWORD, out)
    quoted = f'user,password,note\nbob,"{FORM_PASSWORD[:5]}""{FORM_PASSWORD[5:]}",first\n'
    assert_gone(FORM_PASSWORD[5:], Redactor().redact_text(quoted))
    deep = json.dumps(
        {"note": "the api token is in vault", "value": "x", "data": json.loads("[" * 600 + "]" * 600)}
    )
    assert "[REDACTED:error]" not in Redactor().redact_text(deep)
    prose = "Set your new password; then log in.\nUse the link below; it expires in an hour.\n"
    assert Redactor().redact_text(prose) == prose


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (
            "use access key AKIAIOSFODNN7EXAMPLE with secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "wJalrXUtnFEMI",
        ),
        (
            "access key AKIAQ3EGRL7Y2XW4ZB5N, secret key 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",
            "9dXk2Lq8Vn4Rt7",
        ),
        ("database:\n  credentials:\n    user: app\n    pass: Qm7vT2xK9pLw4\n", "Qm7vT2xK9pLw4"),
        (
            "https://api.telegram.org/bot7012345678:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw/sendMessage",
            "AAHdqTcvCH1v",
        ),
        ("db.internal:5432:prod:app:Qm7vT2xK9pLw5", "Qm7vT2xK9pLw5"),
        ("*:*:*:replicator:s3cret-Pw", "s3cret-Pw"),
        ("The password is: purple monkey dishwasher 42", "purple monkey"),
        ("The password is: correct horse battery staple.", "horse battery"),
        ("le mot de passe est Tr0ub4dor3xyz", "Tr0ub4dor3xyz"),
        ("admin:$apr1$abc$Tr0ub4dor3xyzTr0ub4d", "Tr0ub4dor3xyz"),
        ("root:$6$rounds=5000$saltsalt$Qm7vT2xK9pLw4Qm7vT2xK9pLw4:19000:0:99999:7:::", "Qm7vT2xK9pLw4"),
        ('call login {"otp": "Qm7vT2xK9pLw6", "pin_code": "4821"}; answer done', "Qm7vT2xK9pLw6"),
        ('call login {"otp": "Qm7vT2xK9pLw6", "pin_code": "4821"}; answer done', "4821"),
    ],
)
def test_secrets_a_qa_pass_found_at_rest_are_redacted(text: str, secret: str) -> None:
    """A QA pass (session 24): an AWS secret key in prose, a YAML `pass:`, a Telegram bot token in
    its API's URL, a `.pgpass` line, a passphrase of words after a colon, French, crypt(3) hashes,
    and a one-time code or PIN quoted in a message were all stored as they were."""
    assert secret not in Redactor().redact_text(text)


def test_one_time_codes_pins_and_card_codes_are_secret_names() -> None:
    """... and as the keys of a tool's arguments: `otp`, `pin_code`, `mfa_code`, `cvv`."""
    args = {"otp": "Qm7vT2xK9pLw6", "pin_code": 4821, "mfa_code": "123456", "cvv": "123", "pin": "0000"}
    redacted = Redactor().redact(args)
    assert all(str(v).startswith("[REDACTED") for v in redacted.values()), redacted
    kept = {"pin": {"lat": 48.1, "lng": 11.5}, "zip_code": "10115", "error_code": "E42"}
    assert Redactor().redact(kept) == kept


V25 = "q7Wm2ZrX9kLp4TvB"


@pytest.mark.parametrize(
    "text",
    [
        f"| Name | Value |\n|---|---|\n| DB_PASSWORD | {V25} |\n| DB_HOST | db.internal |",
        f"HOME=/root\nPOSTGRES_PASSWORD\t{V25}\nPATH=/bin",
        f"STRIPE_SECRET_KEY,{V25}\nREGION,eu-west-1",
        f"PARAMETER\t/prod/db/password\t3\tSecureString\t{V25}\t1",
        f"root  812  /usr/bin/worker --db-pass={V25} --port 8080",
        f"root  812  /usr/bin/worker --signing-key {V25}",
        f"export PGPASS={V25}",
        f"CREDENTIALS={V25}",
        f"ROOT_PW={V25}",
        f"STRIPE_SK={V25}",
        f"API_KEY_1={V25}",
        f"DEPLOY_KEY\t{V25}",
        f"AGE-SECRET-KEY-1QQPZRY9X8GF2TVDW0S3JN54KHCE6MUA7LQPZRY9X8GF2TVDW0S3JN54K {V25}"[:74],
        f"PuTTY-User-Key-File-3: ssh-ed25519\nPrivate-Lines: 1\n{V25}AAAAIBQ5cT0v\nPrivate-MAC: ab12",
    ],
    ids=[
        "markdown_row", "tab", "csv", "ssm_text", "flag_equals", "flag_space", "export_pgpass",
        "credentials", "root_pw", "stripe_sk", "numbered", "tab_deploy_key", "age", "putty",
    ],
)  # fmt: skip
def test_a_secret_named_in_a_table_row_or_flag_is_redacted(text: str) -> None:
    """A QA pass (session 25): a markdown table's row, a tab- or comma-separated line, an SSM
    export, a process list's `--db-pass=...`, and names a dict key is judged by (`PGPASS`,
    `CREDENTIALS`, `ROOT_PW`, `API_KEY_1`) kept their values at rest; so did age and PuTTY keys."""
    redacted = Redactor().redact_text(text)
    secret = "QQPZRY9X8GF2" if "AGE-" in text else V25
    assert secret not in redacted and "[REDACTED:" in redacted, redacted


@pytest.mark.parametrize(
    "text",
    [
        "| name | type | notes |\n|---|---|---|\n| password | string | required |",
        "| token | id |\n|---|---|\n| <eos> | 2 |",
        "token,count\nhello,5\nworld,3",
        "AUTH\tbasic\nPORT\t8080",
        "python train.py --max-tokens 512 --session-key default --password-file /run/secrets/db",
        "| `OPENAI_API_KEY` | The key of your OpenAI account |",
        "OPENAI_KEY = cfg.openai[0]",
        "SECRET_KEY = get_secret('django')",
        "DB_PASSWORD\t$DB_PASSWORD",
        "API_KEY\t<your key>",
        "SECRET\t********",
        "TOKEN_LIMIT=4096\nMAX_TOKENS,512",
        "ssh -i ~/.ssh/id --ssh-key ~/.ssh/id_ed25519 host",
    ],
)
def test_settings_tables_flags_and_code_without_secrets_are_kept(text: str) -> None:
    assert Redactor().redact_text(text) == text


def test_escaped_punctuation_without_a_secret_is_kept_as_it_was() -> None:
    """The Gson unescaping is only how the rules read: text with nothing to redact is kept byte for byte."""
    text = '{"html":"\\u003cb\\u003eapi docs\\u003c/b\\u003e","q":"a\\u003d1\\u0026b\\u003d2 token count"}'
    assert Redactor().redact_text(text) == text
    said = "log: password policy says \\u003cmin 12\\u003e; see \\u0027docs\\u0027"
    assert Redactor().redact_text(said) == said
