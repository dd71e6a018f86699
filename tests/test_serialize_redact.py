"""What a user relies on from honed's serialiser and redactor: any object stores, nothing secret does."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import json
import logging
import random
import re
import string
from typing import Any

import pytest
from pydantic import BaseModel

from honed.capture.serialize import Serializer, to_jsonable
from honed.redaction.redact import Redactor
from honed.trajectory import is_truncated

_rng = random.Random(20240611)
ALNUM = string.ascii_letters + string.digits


def rand(n: int, alphabet: str = ALNUM) -> str:
    return "".join(_rng.choice(alphabet) for _ in range(n))


def assert_json(value: Any) -> None:
    json.dumps(value, allow_nan=False)  # strict JSON: no NaN, no objects


def assert_gone(secret: str, text: str) -> None:
    """No 6-character piece of `secret` is left in `text` (markers aside: they name the kind)."""
    text = re.sub(r"\[REDACTED:[a-z0-9_]+\]", "", text)
    leaked = [secret[i : i + 6] for i in range(len(secret) - 5) if secret[i : i + 6] in text]
    assert not leaked, f"secret pieces survived: {leaked[:3]} in {text!r}"


# --- to_jsonable -------------------------------------------------------------------------------------


class Address(BaseModel):
    city: str
    since: datetime.date


class Person(BaseModel):
    name: str
    address: Address
    tags: set[str] = set()


@dataclasses.dataclass
class Point:
    x: int
    y: float
    label: str = "p"


class Node:
    def __init__(self, name: str) -> None:
        self.name = name
        self.next: Node | None = None
        self._private = "hidden"


class BadRepr:
    __slots__ = ()

    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    def __str__(self) -> str:
        raise RuntimeError("no str")


class BadProperty:
    def __init__(self) -> None:
        self.ok = 1

    @property
    def broken(self) -> int:
        raise RuntimeError("boom")


def test_pydantic_model_is_dumped_with_its_type() -> None:
    person = Person(
        name="Ada", address=Address(city="London", since=datetime.date(2020, 5, 1)), tags={"b", "a"}
    )
    out = to_jsonable(person)
    assert out["__type__"].endswith("Person")
    assert out["value"]["name"] == "Ada"
    assert out["value"]["address"] == {"city": "London", "since": "2020-05-01"}
    assert sorted(out["value"]["tags"]) == ["a", "b"]
    assert_json(out)


def test_langchain_message_serialises_via_pydantic() -> None:
    from langchain_core.messages import AIMessage

    message = AIMessage(content="hi", tool_calls=[{"name": "add", "args": {"a": 1}, "id": "c1"}])
    out = to_jsonable(message)
    assert out["__type__"] == "langchain_core.messages.ai.AIMessage"
    assert out["value"]["content"] == "hi"
    assert out["value"]["tool_calls"][0]["args"] == {"a": 1}
    assert_json(out)


def test_dataclass_gives_its_fields() -> None:
    out = to_jsonable(Point(1, 2.5))
    assert out["__type__"].endswith("Point")
    assert out["value"] == {"x": 1, "y": 2.5, "label": "p"}


def test_bytes_are_sized_and_base64_headed() -> None:
    small = to_jsonable(b"\x00\x01hello")
    assert small == {"__type__": "bytes", "size": 7, "base64": base64.b64encode(b"\x00\x01hello").decode()}
    big_data = bytes(range(256)) * 40  # 10,240 bytes
    big = to_jsonable(bytearray(big_data))
    assert big["size"] == 10240 and big["truncated"] is True
    assert base64.b64decode(big["base64"]) == big_data[:4096]
    assert to_jsonable(memoryview(b"abc"))["size"] == 3


def test_numpy_array_and_scalar() -> None:
    np = pytest.importorskip("numpy")
    out = to_jsonable(np.arange(6, dtype=np.int32).reshape(2, 3))
    assert out["dtype"] == "int32" and out["shape"] == [2, 3]
    assert out["value"] == [[0, 1, 2], [3, 4, 5]]
    scalar = to_jsonable(np.float64(1.5))
    assert scalar["value"] == 1.5 and scalar["shape"] == []
    assert to_jsonable(np.array([np.nan]))["value"] == ["NaN"]
    assert_json(out)


def test_cyclic_dict_and_cyclic_object_terminate() -> None:
    data: dict[str, Any] = {"name": "root"}
    data["self"] = data
    data["list"] = [data]
    out = to_jsonable(data)
    assert out["self"] == {"__cycle__": "dict"}
    assert out["list"] == [{"__cycle__": "dict"}]

    a, b = Node("a"), Node("b")
    a.next, b.next = b, a
    out = to_jsonable(a)
    assert out["value"]["name"] == "a"
    assert "_private" not in out["value"]
    assert out["value"]["next"]["value"]["next"] == {"__cycle__": f"{Node.__module__}.Node"}
    assert_json(out)


def test_shared_objects_are_not_cycles() -> None:
    shared = [1, 2]
    assert to_jsonable({"a": shared, "b": shared}) == {"a": [1, 2], "b": [1, 2]}


def test_unprintable_objects_and_raising_attributes_still_serialise() -> None:
    out = to_jsonable({"bad": BadRepr(), BadRepr(): 1})
    assert out["bad"]["value"] == f"<unprintable {BadRepr.__module__}.BadRepr>"
    assert f"<unprintable {BadRepr.__module__}.BadRepr>" in out
    props = to_jsonable(BadProperty())
    assert props["value"] == {"ok": 1}
    assert_json(out)


def test_exception_keeps_type_and_message() -> None:
    out = to_jsonable(ValueError("bad input: 42"))
    assert out == {"__type__": "ValueError", "message": "bad input: 42"}


def test_sets_keep_their_type_and_sort() -> None:
    # The README promises "JSON with its type": a bare list lost that it was a set (issue #15).
    assert to_jsonable({3, 1, 2}) == {"__type__": "set", "value": [1, 2, 3]}
    assert to_jsonable(frozenset({"b", "a"})) == {"__type__": "frozenset", "value": ["a", "b"]}


def test_dates_floats_and_keys() -> None:
    when = datetime.datetime(2024, 6, 11, 12, 30, tzinfo=datetime.UTC)
    out = to_jsonable({"when": when, 1: float("nan"), None: float("inf"), (1, 2): -float("inf")})
    assert out["when"] == {"__type__": "datetime.datetime", "value": "2024-06-11T12:30:00+00:00"}
    assert out["1"] == "NaN" and out["None"] == "Infinity" and out["(1, 2)"] == "-Infinity"
    assert_json(out)


def test_depth_and_size_limits() -> None:
    deep: list[Any] = []
    cursor = deep
    for _ in range(100):
        cursor.append([])
        cursor = cursor[0]
    out = to_jsonable(deep, max_depth=5)
    assert json.dumps(out).count("[") == 5 and "__depth_limit__" in json.dumps(out)

    big = list(range(25_000))
    out = to_jsonable(big)
    assert len(out) == 10_001 and out[-1] == {"__dropped__": 15_000}
    out = to_jsonable({str(i): i for i in range(12_000)})
    assert out["__dropped__"] == 2_000


# --- Serializer: the size cap ------------------------------------------------------------------------


def stored(value: object) -> str:
    """The JSON text honed measures, hashes and stores: compact, UTF-8."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def test_field_over_the_cap_becomes_a_marker_with_size_and_hash() -> None:
    serializer = Serializer(max_field_bytes=4096)
    value = {"rows": [{"id": i, "text": f"row {i} é"} for i in range(500)]}
    full = stored(value).encode()
    out = serializer.field(value)
    assert is_truncated(out)
    assert out["type"] == "dict"
    assert out["size"] == len(full)
    assert out["sha256"] == hashlib.sha256(full).hexdigest()
    assert full.decode().startswith(out["preview"]) and len(out["preview"]) > 3000
    assert len(stored(out).encode()) <= 4096
    assert serializer.dumps(value) == stored(out)


def test_escapes_and_multibyte_text_still_fit_the_cap() -> None:
    serializer = Serializer(max_field_bytes=1024)
    for text in ('"\n\x01' * 2000, "日本語" * 2000):
        out = serializer.field([text])
        assert is_truncated(out)
        assert len(stored(out).encode()) <= 1024


def test_plain_string_over_the_cap_previews_its_head() -> None:
    text = "lorem ipsum " * 1000
    out = Serializer(max_field_bytes=1024).field(text)
    assert is_truncated(out) and out["type"] == "str"
    assert out["size"] == len(text.encode())
    assert out["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert text.startswith(out["preview"]) and len(out["preview"]) > 800
    assert len(stored(out).encode()) <= 1024


def test_small_fields_pass_through() -> None:
    serializer = Serializer()
    assert serializer.field({"a": [1, "x"]}) == {"a": [1, "x"]}
    assert not is_truncated(serializer.field({"a": 1}))
    assert serializer.max_field_bytes == 65536


def test_cap_from_environment(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("HONED_MAX_FIELD_BYTES", "2048")
    assert Serializer().max_field_bytes == 2048
    assert Serializer(max_field_bytes=9000).max_field_bytes == 9000  # the argument wins
    monkeypatch.setenv("HONED_MAX_FIELD_BYTES", "lots")
    with caplog.at_level(logging.WARNING, logger="honed"):
        assert Serializer().max_field_bytes == 65536
    assert "HONED_MAX_FIELD_BYTES" in caplog.text


def test_secret_beyond_the_cap_never_reaches_the_preview() -> None:
    key = "sk-proj-" + rand(64, ALNUM + "-_") + "T3BlbkFJ" + rand(64)
    cap = 1024
    # The key straddles where the preview is cut, and the hash is of the redacted text.
    text = "x" * (cap - 250) + " " + key + " tail " * 200
    serializer = Serializer(max_field_bytes=cap, redactor=Redactor())
    out = serializer.field({"log": text})
    assert is_truncated(out)
    assert_gone(key, json.dumps(out))
    # Redacted fields carry no hash: the full text was never all redacted, and a hash of a text that
    # holds a secret would confirm a guess of it. The size is the original's.
    assert "sha256" not in out
    assert out["size"] == len(stored({"log": text}).encode())


def test_serializer_redacts_objects_before_storing() -> None:
    class Settings(BaseModel):
        model: str
        api_key: str

    key = "sk-" + rand(48)
    out = Serializer(redactor=Redactor()).field(Settings(model="gpt", api_key=key))
    assert out["value"] == {"model": "gpt", "api_key": "[REDACTED:api_key]"}


# --- Redactor ----------------------------------------------------------------------------------------


def _jwt() -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps({"sub": rand(10), "iat": 1718000000}).encode())
    return f"{header}.{payload}.{rand(43, ALNUM + '-_')}"


def _pem() -> str:
    body = "\n".join(rand(64, ALNUM + "+/") for _ in range(5))
    return f"-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----"


SECRETS = {
    "openai_key": ("sk-" + rand(20) + "T3BlbkFJ" + rand(20), "set OPENAI key {} then retry"),
    "openai_project_key": ("sk-proj-" + rand(100, ALNUM + "-_") + "T3BlbkFJ" + rand(60), "key: {}"),
    "anthropic_key": ("sk-ant-api03-" + rand(93, ALNUM + "-_") + "AA", "export ANTHROPIC={} # ok"),
    "aws_access_key": ("AKIA" + rand(16, string.ascii_uppercase + string.digits), "id {} used"),
    "aws_secret_key": (rand(40, ALNUM + "/+"), "aws_secret_access_key = {}\nregion = eu-west-1"),
    "github_token": ("ghp_" + rand(36), "git push with {} failed"),
    "github_oauth": ("gho_" + rand(36), "token={}&x=1"),
    "github_pat": (
        "github_pat_11" + rand(20, string.ascii_uppercase + string.digits) + "_" + rand(59),
        "use {}",
    ),
    "slack_token": (f"xoxb-{rand(12, string.digits)}-{rand(13, string.digits)}-{rand(24)}", "slack {}."),
    "google_api_key": ("AIza" + rand(35, ALNUM + "-_"), "maps?key={}&q=paris"),
    "jwt": (_jwt(), "cookie-less session {} expired"),
    "bearer": (rand(40, ALNUM + "-._~"), "curl -H 'Authorization: Bearer {}' https://api.example.com"),
    "bare_bearer": (rand(32), "sent Bearer {} to the API"),
    "basic": (base64.b64encode(f"alice:{rand(16)}".encode()).decode(), "Authorization: Basic {}"),
    "password_assignment": (rand(14), "password = '{}'"),
    "password_json": (rand(14), '{{"user": "bob", "password": "{}"}}'),
    "private_key": (_pem(), "here is the key:\n{}\nkeep it safe"),
}


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_each_secret_kind_is_redacted_in_free_text(name: str) -> None:
    secret, template = SECRETS[name]
    text = template.format(secret)
    out = Redactor().redact_text(text)
    assert "[REDACTED:" in out
    assert_gone(secret, out)


def test_markers_name_the_kind() -> None:
    redactor = Redactor()
    assert redactor.redact_text(SECRETS["openai_key"][0]) == "[REDACTED:openai_key]"
    assert redactor.redact_text(SECRETS["anthropic_key"][0]) == "[REDACTED:anthropic_key]"
    assert redactor.redact_text("Authorization: Bearer abcDEF123456ghiJKL789") == (
        "Authorization: Bearer [REDACTED:bearer]"
    )
    assert redactor.redact_text("password = 'hunter2'") == "password = '[REDACTED:password]'"


def test_url_password_keeps_user_and_host() -> None:
    password = rand(18, ALNUM + "!$%")
    text = f"connect to postgresql://alice:{password}@db.internal.example.com:5432/app now"
    out = Redactor().redact_text(text)
    assert out == "connect to postgresql://alice:[REDACTED:password]@db.internal.example.com:5432/app now"


def test_secret_named_keys_are_redacted_but_token_counts_kept() -> None:
    value = {
        "api_key": "anything",
        "Authorization": "Basic abc",
        "x-api-key": "k",
        "password": "hunter2",
        "OPENAI_API_KEY": "sk-whatever",
        "client_secret": {"nested": "value"},
        "refresh_token": "r",
        "set-cookie": "sid=1",
        "token": None,
        "usage": {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15, "max_tokens": 100, "tokens": 3},
        "messages": [{"role": "user", "content": "hello", "private_key": "x"}],
    }
    out = Redactor().redact(value)
    assert out["api_key"] == "[REDACTED:api_key]"
    assert out["Authorization"] == "[REDACTED:authorization]"
    assert out["x-api-key"] == "[REDACTED:api_key]"
    assert out["password"] == "[REDACTED:password]"
    assert out["OPENAI_API_KEY"] == "[REDACTED:api_key]"
    assert out["client_secret"] == "[REDACTED:secret]"
    assert out["refresh_token"] == "[REDACTED:token]"
    assert out["set-cookie"] == "[REDACTED:cookie]"
    assert out["token"] is None  # nothing to hide
    assert out["usage"] == value["usage"]
    assert out["messages"] == [{"role": "user", "content": "hello", "private_key": "[REDACTED:private_key]"}]


def test_ordinary_text_passes_unchanged() -> None:
    redactor = Redactor()
    for text in (
        "The weather in Paris is sunny, 21 °C.",
        "I used 512 input tokens and 128 output tokens; max_tokens = 1024.",
        "The key insight: the bearer of bad news was late. Authorization: required.",
        "Install scikit-learn and run the task-list-for-the-week-is-long script.",
        # after `-`, a plain `sk-` key has no `-` in it (a QA pass, session 28)
        "Archived as my-sk-learn-models-2024-archive-v3 and team_sk-learn-notes-2024-q3.",
        "token_count: 3, num_tokens=7, key = 'name'",
        "Next token: hello. The secret: always test first.",
        "see https://example.com:8080/path?q=a@b and mail bob@example.com",
        "",
    ):
        assert redactor.redact_text(text) == text


def test_long_ordinary_text_is_returned_as_is() -> None:
    text = "The assistant looked up the weather and added 3 and 4 for the user. " * 2000
    out = Redactor().redact_text(text)
    assert out == text


def _sendgrid() -> str:  # a shape only detect-secrets knows
    return f"SG.{rand(22, ALNUM + '-_')}.{rand(43, ALNUM + '-_')}"


def test_detect_secrets_covers_the_long_tail() -> None:
    key = _sendgrid()
    assert key in Redactor(use_detect_secrets=False).redact_text(f"mailed with {key} today")
    out = Redactor().redact_text(f"mailed with {key} today")
    assert_gone(key, out)
    assert "[REDACTED:sendgrid_api_key]" in out


def test_detect_secrets_settings_of_other_code_are_left_alone() -> None:
    from detect_secrets.settings import get_settings, transient_settings

    key = _sendgrid()
    with transient_settings({"plugins_used": [{"name": "AWSKeyDetector"}]}):
        out = Redactor().redact_text(f"mailed with {key} today")
        assert set(get_settings().plugins) == {"AWSKeyDetector"}
    assert_gone(key, out)


def test_own_rules_work_without_detect_secrets() -> None:
    redactor = Redactor(use_detect_secrets=False)
    for name in ("openai_key", "github_token", "bearer", "private_key", "password_json"):
        secret, template = SECRETS[name]
        assert_gone(secret, redactor.redact_text(template.format(secret)))


def test_hook_runs_last_and_a_raising_hook_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []

    def mask_emails(text: str) -> str:
        seen.append(text)
        return text.replace("bob@example.com", "<email>")

    redactor = Redactor(mask_emails)
    key = "ghp_" + rand(36)
    assert redactor.redact_text(f"mail bob@example.com {key}") == "mail <email> [REDACTED:github_token]"
    assert seen == ["mail bob@example.com [REDACTED:github_token]"]  # the hook sees redacted text
    assert redactor.redact({"a": ["bob@example.com"]}) == {"a": ["<email>"]}

    def broken(text: str) -> str:
        raise RuntimeError("hook bug")

    redactor = Redactor(broken)
    with caplog.at_level(logging.ERROR, logger="honed"):
        assert redactor.redact_text(f"x {key}") == "x [REDACTED:github_token]"
        assert redactor.redact({"b": "plain"}) == {"b": "plain"}
    assert len([r for r in caplog.records if "hook" in r.getMessage()]) == 1


def test_redact_never_raises() -> None:
    looped: list[Any] = []
    looped.append(looped)
    assert Redactor().redact(looped) == "[REDACTED:error]"
    assert Redactor().redact(42) == 42
    assert Redactor().redact_text(None) is None  # type: ignore[arg-type]


def _random_field(rng: random.Random, depth: int = 0) -> Any:
    """Nested data as agents hand it over: secrets in values and keys, secret-named keys, JSON
    schemas, non-string keys, objects, odd floats, big integers."""
    secrets = [
        "ghp_" + rand(36),
        "sk-proj-" + rand(40) + "T3BlbkFJ" + rand(20),
        "AKIA" + "Q" * 16,
        "eyJhbGciOiJIUzI1NiJ9.eyJ" + rand(30) + "." + rand(43),
        "Bearer " + rand(30),
        "-----BEGIN RSA PRIVATE KEY-----\nMIIE" + rand(200) + "\n-----END RSA PRIVATE KEY-----",
        "password = 'hunter2x'",
        "postgres://u:" + rand(10) + "@host/db",
    ]
    # Secrets no string shows alone: a .env file's bytes, a header as a name/value pair.
    hidden = [f"OPENAI_API_KEY=sk-proj-{rand(40)}\n".encode(), ["X-Api-Key", rand(20)], ["Accept", "*/*"]]
    words = ["hello", "max_tokens", "the next token", "é☃", "\ud800x", "a" * 300, "ordinary text about keys"]
    keys = [
        "role",
        "content",
        "api_key",
        "password",
        "auth",
        "tokens",
        "properties",
        "type",
        "eos_token",
        "x",
        "name",
        "value",
        "pass",
    ]
    r = rng.random()
    if depth > 4 or r < 0.35:
        c = rng.random()
        if c < 0.15:
            return rng.choice(secrets)
        if c < 0.2:
            return rng.choice(hidden)
        if c < 0.6:
            return rng.choice(words) + (" " + rng.choice(secrets) if rng.random() < 0.1 else "")
        return rng.choice([None, True, False, 0, 7, 2**70, 1.5, float("nan"), "", datetime.date(2024, 1, 2)])
    if r < 0.7:
        d: dict[Any, Any] = {}
        for _ in range(rng.randint(0, 5)):
            key = rng.choice(keys) if rng.random() < 0.9 else rng.choice([1, None, (1, 2)])
            d[key] = _random_field(rng, depth + 1)
        if rng.random() < 0.2:
            d["type"] = "object"
        if rng.random() < 0.1:
            d.update(name=rng.choice(["DB_PASSWORD", "LOG_LEVEL", "pass"]), value=rand(12))
        return d
    if r < 0.9:
        items = [_random_field(rng, depth + 1) for _ in range(rng.randint(0, 5))]
        return tuple(items) if rng.random() < 0.2 else items
    return Point(_random_field(rng, depth + 1), {rng.choice(keys): _random_field(rng, depth + 1)})


@pytest.mark.parametrize("cap", [512, 65536])
@pytest.mark.parametrize("hooked", [False, True])
def test_one_walk_stores_exactly_what_two_walks_do(
    cap: int, hooked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A field is serialised and redacted in one walk when nothing in it is a secret; the result
    (value, JSON text, cap marker) is the two-walk reference's, secrets and hook included."""
    import honed.capture.serialize as serialize

    def hook(text: str) -> str:
        return text.replace("ab", "AB")

    fast = Serializer(max_field_bytes=cap, redactor=Redactor(hook if hooked else None))
    reference_redactor = Redactor(hook if hooked else None)
    reference = Serializer(max_field_bytes=cap, redactor=reference_redactor)

    class TwoWalks(serialize._RedactingWalker):
        def walk(self, obj: Any, depth: int) -> Any:
            raise serialize._OverCap

    rng = random.Random(cap + hooked)
    for _ in range(400):
        field = _random_field(rng)
        if rng.random() < 0.2:
            field = [field]
            field.append(field)  # a cycle
        got = fast.dumps(field)
        with monkeypatch.context() as patch:
            patch.setattr(serialize, "_RedactingWalker", TwoWalks)
            reference_redactor._texts.clear()  # nothing remembered: every text redacted anew
            assert got == reference.dumps(field)


@pytest.mark.parametrize("redact", [True, False])
def test_a_field_of_shared_sub_objects_is_cut_at_the_cap_not_walked_whole(redact: bool) -> None:
    """A QA pass (session 17): a tool's artifact `[[0] * 10_000] * 10_000` (one row shared 10,000
    times: no cycle, 10^8 nodes) was walked whole before the cap cut it, stalling the writer for
    minutes while every later run waited; a 1000 x 1000 matrix cost 2 s of the writer's GIL."""
    import time

    serializer = Serializer(redactor=Redactor() if redact else None)
    for payload in ([[0] * 10_000] * 10_000, [[float(i) for i in range(1000)] for _ in range(1000)]):
        started = time.perf_counter()
        field = serializer.field({"artifact": payload})
        assert time.perf_counter() - started < 5.0  # minutes before, ~0.05 s now
        assert field["__truncated__"] is True and field["preview"].startswith('{"artifact":[[0')
    # Shared, but small: whole, as before.
    row = [1, 2, 3]
    assert serializer.field({"a": row, "b": row}) == {"a": [1, 2, 3], "b": [1, 2, 3]}


def test_an_integer_past_64_bits_is_kept_as_text_and_the_rest_of_the_field_with_it() -> None:
    """A QA pass (session 20): a state holding a 6,000-digit checksum beside the answer was stored
    as `<unserialisable>`: the answer lost, a correct run failed by its reference."""
    out = Serializer().field({"answer": "42", "checksum": 7**6000, "big": 2**70, "small": -(2**63)})
    assert out["answer"] == "42" and out["small"] == -(2**63)
    assert out["big"] == {"__type__": "int", "value": str(2**70)}
    assert out["checksum"]["__type__"] == "int" and "bits" in out["checksum"]["value"]
    assert json.loads(json.dumps(out)) == out


def test_the_hook_runs_on_keys_and_keeps_every_entry() -> None:
    """A QA pass (session 22): the hook skipped dict keys (`honed serve`'s label key sent as a
    metadata key was stored); then a review: keys masked alike merged, one balance kept of three."""
    import re

    hook = lambda s: re.sub(r"[\w.]+@[\w.]+", "<EMAIL>", s)  # noqa: E731
    balances = {"ann@x.io": 120, "bob@y.io": 80, "cy@z.io": 5}
    out = Redactor(hook).redact({"balances": balances})
    assert sorted(out["balances"].values()) == [5, 80, 120] and "ann@x.io" not in str(out)
    assert Serializer(redactor=Redactor(hook)).field({"balances": balances}) == out
