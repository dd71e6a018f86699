"""Secret redaction for captured runs, so trajectories can be stored, shared and trained on.

Three passes over each string, cheapest first, all on the writer thread:

1. a prefilter (one small regex and a few substring tests) that lets ordinary text through untouched;
2. honed's own regexes for the secrets agents handle most (provider keys, bearer and basic credentials,
   JWTs, URL passwords, PEM blocks, `password = ...` assignments); they replace the *whole* secret, where
   detect-secrets sometimes reports only a part of it (`ghp` for a GitHub token, a JWT without its
   signature, a PEM header without its body);
3. detect-secrets (without its HighEntropy plugins, which flag ordinary words) on the few lines that
   still look like a secret it knows: the long tail of vendor tokens and keyword assignments.

A secret becomes `[REDACTED:<kind>]`, e.g. `[REDACTED:openai_key]`. The user hook runs last.

    >>> Redactor().redact_text("Authorization: Bearer abcDEF123456ghiJKL789")
    'Authorization: Bearer [REDACTED:bearer]'
"""

from __future__ import annotations

import atexit
import logging
import re
import threading
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

logger = logging.getLogger("honed")

# detect-secrets plugins left out: HighEntropy ones flag ordinary words ("hello"), and public IP
# addresses are not secrets (agents look them up all the time).
_EXCLUDED_PLUGINS = frozenset({"Base64HighEntropyString", "HexHighEntropyString", "IPPublicDetector"})
_KEY_CACHE_SIZE = 4096
# detect-secrets scans ~2 µs per character: it sees each candidate's line clipped to ±_DS_WINDOW
# characters, windows merged up to _DS_MAX_WINDOW, and at most _DS_MAX_CHARS per text (~0.15 s).
_DS_WINDOW = 512
_DS_MAX_WINDOW = 4096
_DS_MAX_CHARS = 65536
# A secret detect-secrets finds is replaced everywhere in the text only from this length on: shorter
# values ("none", "admin") would also hit ordinary words far from where they were found.
_ECHO_MIN = 12
# The shortest text a rule can act on ("a://b:c@", "pwd=abc1"): shorter strings ("user", "7") skip it all.
_MIN_SECRET_TEXT = 8


def _marker(kind: str) -> str:
    return f"[REDACTED:{kind}]"


class Redactor:
    """Replaces secrets in strings and in JSON-able data; never raises.

    Args:
        hook: runs last on every string value (after the built-in redaction) and returns its
            replacement; if it raises, the error is logged once and the built-in result is kept.
        use_detect_secrets: also run detect-secrets on candidate lines (slower, wider coverage).

    `redact` also replaces the whole value of dict keys that name a secret (`api_key`, `password`,
    `authorization`, `token`, `cookie`, `*_password`, `*_api_key`, ...) but not token *counts*
    (`tokens`, `input_tokens`, `max_tokens`, ...).
    """

    def __init__(self, hook: Callable[[str], str] | None = None, *, use_detect_secrets: bool = True) -> None:
        self._hook = hook
        self._use_detect_secrets = use_detect_secrets
        self._hook_failure_logged = False
        self._error_logged = False
        # Keys repeat across every event ("role", "content", ...): decide each one once.
        self._keys: dict[str, tuple[str, str | None]] = {}

    def redact_text(self, text: str) -> str:
        """`text` with every secret found replaced by `[REDACTED:<kind>]`, then the hook applied."""
        if not isinstance(text, str):
            return text
        try:
            out = self._builtin(text)
        except Exception:  # never store text the redactor could not vouch for
            self._log_error()
            out = _marker("error")
        if self._hook is not None:
            out = self._apply_hook(out)
        return out

    def redact(self, value: Any) -> Any:
        """A copy of JSON-able `value` with every string redacted and secret-named keys' values replaced."""
        try:
            return self._walk(value)
        except Exception:  # e.g. a cycle in hand-built data: RecursionError
            self._log_error()
            return _marker("error")

    def _walk(self, value: Any) -> Any:
        t = type(value)
        if t is str:
            return self.redact_text(value)
        if t is dict:
            out: dict[Any, Any] = {}
            for key, item in value.items():
                new_key, kind = self._key(key) if type(key) is str else (key, None)
                if kind is not None and item is not None and item != "":
                    out[new_key] = _marker(kind)
                else:
                    out[new_key] = self._walk(item)
            return out
        if t is list or t is tuple:
            return [self._walk(item) for item in value]
        return value

    def _key(self, key: str) -> tuple[str, str | None]:
        known = self._keys.get(key)
        if known is None:
            if len(self._keys) >= _KEY_CACHE_SIZE:
                self._keys.clear()
            # Keys get the built-in redaction but not the hook, which is for values.
            try:
                redacted = self._builtin(key)
            except Exception:
                self._log_error()
                redacted = _marker("error")
            known = (redacted, secret_key_kind(key))
            self._keys[key] = known
        return known

    def _builtin(self, text: str) -> str:
        if len(text) < _MIN_SECRET_TEXT:
            return text
        lowered = _lower(text)
        if not _is_candidate(text, lowered):
            return text
        for rule in _RULES:
            redacted = rule.apply(text, lowered)
            if redacted is not text:
                text, lowered = redacted, _lower(redacted)
        if self._use_detect_secrets:
            text = _DETECT_SECRETS.redact(text, lowered)
        return text

    def _apply_hook(self, text: str) -> str:
        try:
            out = self._hook(text)  # type: ignore[misc]
        except Exception:
            if not self._hook_failure_logged:
                self._hook_failure_logged = True
                logger.exception(
                    "honed: the redact hook raised; keeping the built-in redaction (logged once)"
                )
            return text
        if isinstance(out, str):
            return out
        if not self._hook_failure_logged:
            self._hook_failure_logged = True
            logger.error("honed: the redact hook returned %s, not str; ignoring it (logged once)", type(out))
        return text

    def _log_error(self) -> None:
        if not self._error_logged:
            self._error_logged = True
            logger.exception("honed: redaction failed; the value is stored as [REDACTED:error] (logged once)")


# --- Keys that name a secret -------------------------------------------------------------------------

_SECRET_KEYS = {
    **dict.fromkeys(("password", "passwd", "pwd", "passphrase", "db_password"), "password"),
    **dict.fromkeys(("api_key", "apikey", "x_api_key", "api_token", "x_goog_api_key"), "api_key"),
    **dict.fromkeys(("authorization", "proxy_authorization"), "authorization"),
    **dict.fromkeys(("secret", "client_secret", "clientsecret", "secret_key", "secretkey"), "secret"),
    **dict.fromkeys(("private_key", "privatekey"), "private_key"),
    **dict.fromkeys(("cookie", "set_cookie", "cookies"), "cookie"),
    **dict.fromkeys(("aws_secret_access_key", "aws_secret_key", "aws_session_token"), "aws_secret_key"),
    **dict.fromkeys(
        (
            "token",
            "access_token",
            "accesstoken",
            "refresh_token",
            "refreshtoken",
            "id_token",
            "idtoken",
            "auth_token",
            "authtoken",
            "bearer_token",
            "session_token",
            "sessiontoken",
            "csrf_token",
            "github_token",
            "gh_token",
            "hf_token",
            "slack_token",
            "x_auth_token",
            "x_access_token",
        ),
        "token",
    ),
}
_SECRET_SUFFIXES = (
    ("_password", "password"),
    ("_passwd", "password"),
    ("_secret", "secret"),
    ("_client_secret", "secret"),
    ("_secret_key", "secret"),
    ("_api_key", "api_key"),
    ("_apikey", "api_key"),
    ("_access_token", "token"),
    ("_refresh_token", "token"),
    ("_auth_token", "token"),
    ("_private_key", "private_key"),
)


def secret_key_kind(key: str) -> str | None:
    """The redaction kind of a dict key that names a secret (`"OPENAI_API_KEY"` -> `"api_key"`), else None.

    Token *counts* (`tokens`, `input_tokens`, `max_tokens`) are not secrets and give None.
    """
    norm = key.strip().lower().replace("-", "_").replace(" ", "_")
    kind = _SECRET_KEYS.get(norm)
    if kind is None:
        for suffix, suffix_kind in _SECRET_SUFFIXES:
            if norm.endswith(suffix):
                return suffix_kind
    return kind


# --- Prefilter ---------------------------------------------------------------------------------------

# Branches start on characters rare in prose ('-', '_', capitals, ':') and check the rest with
# lookarounds: CPython's `re` tries every branch at every position, so a plain alternation of these
# candidates costs ~100 µs per 250 characters, this one ~1.5 µs.
_ANCHORS = re.compile(
    r"-(?:(?<=sk-)|(?<=xox[abposr]-)|(?<=pypi-)|(?<=sq0csp-)|(?<=gl[a-z]{2}-)|(?<=gl[a-z]{3}-)"
    r"|(?<=glagent-)|(?=----BEGIN))"
    r"|_(?:(?<=gh[pousr]_)|(?<=github_pat_)|(?<=k_live_)|(?<=npm_)|(?=authToken))"
    r"|A(?:KIA|SIA|BIA|CCA|3T|Iza|KC|ccountKey)|PRIVATE KEY|GR1348941|SG\.|J(?<=eyJ)"
    r"|:(?=//[^\s/?#@]*@)"
)
# Case-insensitive words are found with `str.find` on the lowered text, ~20x faster than `(?i)` in `re`.
_KEYWORDS = (
    "key",
    "token",
    "secret",
    "passw",
    "passphrase",
    "pwd",
    "bearer",
    "authoriz",
    "cookie",
    "contrase",
)


def _is_candidate(text: str, lowered: str) -> bool:
    if _ANCHORS.search(text) is not None:
        return True
    # A plain loop: `any(generator)` costs more than the tests themselves on short strings.
    for word in _KEYWORDS:  # noqa: SIM110
        if word in lowered:
            return True
    return False


def _lower(text: str) -> str:
    """`text` lowered with every offset kept, so positions found in it hold in `text`."""
    lowered = text.lower()
    if len(lowered) != len(text):  # a few characters lower to two ("İ")
        lowered = text.encode("ascii", "replace").decode("ascii").lower()
    return lowered


# --- honed's own rules -------------------------------------------------------------------------------

_NOT_REDACTED = r"(?!\[REDACTED:)"
_QUOTE_OPEN = r"\\?['\"]?"  # optional (JSON-escaped) quote around a header or key name
_SEP = rf"{_QUOTE_OPEN}[ \t]*[:=][ \t]*{_QUOTE_OPEN}"


class _Rule:
    """One secret shape and its replacement.

    Without `anchors` the pattern must begin with a literal, which `re` finds fast. With `anchors`
    (lowercase words) it is tried only where one of them starts in the text, and matches from there:
    that is how the case-insensitive shapes stay cheap.
    """

    __slots__ = ("anchors", "pattern", "replace")

    def __init__(
        self,
        pattern: str,
        replace: str | Callable[[re.Match[str]], str],
        anchors: tuple[str, ...] = (),
    ) -> None:
        self.pattern = re.compile(pattern)
        self.replace = replace
        self.anchors = anchors

    def apply(self, text: str, lowered: str) -> str:
        if not self.anchors:
            return self.pattern.sub(self.replace, text)
        pieces: list[str] = []
        last = 0
        for m in _anchored_matches(self.pattern, self.anchors, text, lowered):
            pieces.append(text[last : m.start()])
            pieces.append(self.replace(m) if callable(self.replace) else m.expand(self.replace))
            last = m.end()
        if not pieces:
            return text
        pieces.append(text[last:])
        return "".join(pieces)


def _anchored_matches(
    pattern: re.Pattern[str], anchors: tuple[str, ...], text: str, lowered: str
) -> list[re.Match[str]]:
    """Non-overlapping matches of `pattern` that start where one of `anchors` starts in `lowered`."""
    starts: set[int] = set()
    for word in anchors:
        at = lowered.find(word)
        while at >= 0:
            starts.add(at)
            at = lowered.find(word, at + 1)
    matches: list[re.Match[str]] = []
    last = 0
    for start in sorted(starts):
        if start < last:
            continue
        m = pattern.match(text, start)  # lookbehinds still see the text before `start`
        if m is not None and m.end() > start:
            matches.append(m)
            last = m.end()
    return matches


def _whole(kind: str, *, left_bounded: bool = False) -> Callable[[re.Match[str]], str]:
    """Replace the whole match; with `left_bounded`, only when it does not continue a longer word."""

    def replace(m: re.Match[str]) -> str:
        if left_bounded and _continues_word(m):
            return m.group(0)
        return _marker(kind)

    return replace


def _continues_word(m: re.Match[str]) -> bool:
    start = m.start()
    return start > 0 and (m.string[start - 1].isalnum() or m.string[start - 1] in "_-")


def _group(group: int, kind: str) -> Callable[[re.Match[str]], str]:
    """Replace one group of the match, keeping its context (key names, user, host)."""

    def replace(m: re.Match[str]) -> str:
        return _splice(m, group, _marker(kind))

    return replace


def _splice(m: re.Match[str], group: int, new: str) -> str:
    whole = m.group(0)
    start, end = m.start(group) - m.start(), m.end(group) - m.start()
    return whole[:start] + new + whole[end:]


def _openai(m: re.Match[str]) -> str:
    if _continues_word(m):
        return m.group(0)  # "task-..." / "disk-..." are words, not keys
    key = m.group(0)
    # Plain "sk-" needs a digit or the OpenAI tag: "sk-learn-and-other-long-hyphenated-words" is prose.
    if m.group(1) or "T3BlbkFJ" in key or any(c.isdigit() for c in key):
        return _marker("openai_key")
    return key


def _authorization(m: re.Match[str]) -> str:
    scheme, credentials = m.group(2), m.group(3)
    if scheme:
        kind = {"bearer": "bearer", "basic": "basic_auth"}.get(scheme.lower(), "authorization")
        return _splice(m, 3, _marker(kind))
    # Without a scheme, insist on a credential shape so "Authorization: required" stays prose.
    if len(credentials) >= 8 and any(c.isdigit() for c in credentials):
        return _splice(m, 3, _marker("authorization"))
    return m.group(0)


def _bearer(m: re.Match[str]) -> str:
    token = m.group(1)
    if len(token) >= 8 and (len(token) >= 20 or any(c.isdigit() for c in token)):
        return _splice(m, 1, _marker("bearer"))
    return m.group(0)  # "the bearer of bad news"


def _assignment(m: re.Match[str]) -> str:
    word = m.group(1).lower()
    if word.startswith(("pass", "pwd", "contrase")):
        kind = "password"
    elif word in ("token", "secret"):
        kind = word
    else:  # "...key": say which key when the name tells
        name = m.string[max(0, m.start() - 8) : m.start()].lower()
        kind = "private_key" if "priv" in name else "secret" if "secret" in name else "api_key"
    if m.group(4) is not None:
        return _splice(m, 4, _marker(kind))
    # Unquoted after a colon: "password: hunter2" is a secret, but "token: the next word" and
    # "secret: always test" are prose, so other kinds need a credential's shape (a digit, or length).
    value = m.group(5)
    if (
        kind != "password"
        and "=" not in m.group(2)
        and len(value) < 16
        and not any(c.isdigit() for c in value)
    ):
        return m.group(0)
    return _splice(m, 5, _marker(kind))


def _after(*prefixes: str) -> str:
    """A lookbehind alternation: `key` counts only as `api_key`, `private_key`, ... not as `key`."""
    return "(?:" + "|".join(f"(?<={p}{sep})" for p in prefixes for sep in ("", "_", "-")) + ")"


_RULES = (
    # PEM private keys, header to footer across lines; an unterminated block is redacted to the end.
    _Rule(
        r"(?s)-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*?"
        r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)",
        _marker("private_key"),
    ),
    _Rule(r"sk-ant-[A-Za-z0-9_-]{16,}", _whole("anthropic_key", left_bounded=True)),
    _Rule(r"sk-(proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}", _openai),
    _Rule(r"(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})", _whole("github_token")),
    _Rule(r"xox[abposr]-[A-Za-z0-9-]{10,}", _whole("slack_token")),
    _Rule(r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]+", _marker("slack_webhook")),
    _Rule(r"AIza[0-9A-Za-z_-]{35}", _whole("google_api_key")),
    _Rule(
        r"(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}(?![A-Z0-9])",
        _whole("aws_access_key", left_bounded=True),
    ),
    _Rule(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}(?:\.[A-Za-z0-9_-]*)?", _whole("jwt")),
    # scheme://user:PASSWORD@host: user and host stay, the password goes (up to the last '@').
    _Rule(rf"://[^\s:/?#@'\"<>]*:{_NOT_REDACTED}([^\s/?#'\"<>]+)@", _group(1, "password")),
    _Rule(
        rf"(?i)(?:aws_?secret_?access_?key|aws_?secret_?key|secret_?access_?key){_SEP}"
        rf"{_NOT_REDACTED}([A-Za-z0-9/+=]{{16,}})",
        _group(1, "aws_secret_key"),
        anchors=("aws", "secret"),
    ),
    _Rule(
        rf"(?i)\b(authorization{_SEP})(?:(basic|bearer|token|digest|negotiate|ntlm|apikey)[ \t]+)?"
        rf"{_NOT_REDACTED}([A-Za-z0-9._~+/=:-]+)",
        _authorization,
        anchors=("authorization",),
    ),
    _Rule(rf"(?i)\bbearer[ \t]+{_NOT_REDACTED}([A-Za-z0-9._~+/-]+=*)", _bearer, anchors=("bearer",)),
    # X-Api-Key, Api-Key, X-Goog-Api-Key, X-Auth-Token, X-Access-Token, Private-Token headers.
    _Rule(
        rf"(?i)(?:api-key|auth-token|access-token|private-token){_SEP}{_NOT_REDACTED}([^\s'\"`,;\\]{{6,}})",
        _group(1, "api_key"),
        anchors=("api-key", "auth-token", "access-token", "private-token"),
    ),
    _Rule(
        rf"(?i)cookie\\?['\"]?[ \t]*:[ \t]*\\?['\"]?{_NOT_REDACTED}([^\r\n'\"\\]+)",
        _group(1, "cookie"),
        anchors=("cookie",),
    ),
    # password = '...', "api_key": "...", TOKEN=..., secret: ... The name must end at the operator, so
    # "max_tokens = 5" and "token_count: 3" stay; a bare "key = ..." is ordinary code and stays too.
    _Rule(
        r"(?i)(passw(?:or)?d|pwd|passphrase|contrase(?:ñ|n)a|secret|token|"
        + _after("api", "access", "private", "auth", "secret", "client")
        + r"key)(?![A-Za-z0-9_])"
        r"([\\'\"\]]{0,3}[ \t]*(?:=>|:=|==?|:)[ \t]*)"
        rf"(?:\\?(['\"`]){_NOT_REDACTED}([^'\"`\r\n\\]+)\\?\3|(?![\\'\"`\[])([^\s'\"`,;&)}}\]\\]+))",
        _assignment,
        anchors=("passw", "pwd", "passphrase", "contrase", "secret", "token", "key"),
    ),
)


# --- detect-secrets ----------------------------------------------------------------------------------

# What detect-secrets finds that the rules above do not: vendor tokens with a literal prefix (Stripe,
# SendGrid, Square, PyPI, npm, GitLab, Azure, Artifactory), anchored on rare characters as above ...
_DS_LITERALS = re.compile(
    r"-(?:(?<=pypi-)Ag|(?<=sq0csp-)|(?<=gl[a-z]{2}-)|(?<=gl[a-z]{3}-)|(?<=glagent-))"
    r"|_(?:(?<=k_live_)|(?<=npm_)|(?=authToken))"
    r"|SG\.[\w-]{20}|GR1348941|AccountKey=|AKC[A-Za-z0-9]{10}"
)
# ... and the quoted keyword assignments the rules left unredacted (`secrets = '...'`, `"x" == pwd`,
# `private_key "..." ;`), with detect-secrets' own keyword list; the value must start with a word
# character, as detect-secrets' regexes require.
_DS_WORDS = (
    r"(?:passw|pwd|secret|contrase|"
    + _after("api", "auth", "service", "account", "db", "database", "priv", "private", "client")
    + "key|"
    + _after("db", "database", "key")
    + "pass)"
)
_DS_ASSIGNMENT = re.compile(
    rf"(?i){_DS_WORDS}\w*[\\'\"\]]{{0,3}}\s*(?:[=!:]=?=?|=>)\s*@?\\?['\"`]{_NOT_REDACTED}\w"
    rf"|{_DS_WORDS}\S{{0,50}}?\s*['\"`]{_NOT_REDACTED}\w[^'\"`\n]*['\"`];"
)
_DS_ANCHORS = ("passw", "pwd", "secret", "contrase", "key", "pass")
_MARKER_SPLIT = re.compile(r"(\[REDACTED:[a-z0-9_]+\])")
_SECRET_TAIL = re.compile(r"[A-Za-z0-9_+/=.-]*")
_NON_WORD = re.compile(r"[^a-z0-9]+")
_KIND_BY_TYPE = {
    "Secret Keyword": "secret",
    "Basic Auth Credentials": "password",
    "OpenAI Token": "openai_key",
    "AWS Access Key": "aws_access_key",
    "JSON Web Token": "jwt",
}


class _DetectSecrets:
    """The one gate to detect-secrets, whose settings are process-global.

    `transient_settings` costs ~0.9 ms to enter and leave, more than a scan: while no other code has a
    configuration active, honed's is entered once and held. If other code's configuration is active, a
    scan runs inside a fresh `transient_settings` instead, so neither side sees the other's plugins.
    One lock serialises scans, because `scan_line` itself mutates the global settings.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held = ExitStack()
        # Leave the held settings while the interpreter can still import: left to the garbage
        # collector at shutdown, detect-secrets' cleanup prints an ImportError traceback.
        atexit.register(self._release)
        self._config: dict[str, Any] | None = None
        self._names: set[str] = set()
        self._unavailable = False
        self._error_logged = False

    def _release(self) -> None:
        with self._lock:
            try:
                self._held.close()
            except Exception:
                logger.debug("honed: could not leave detect-secrets' settings", exc_info=True)

    def redact(self, text: str, lowered: str) -> str:
        if self._unavailable:
            return text
        spans = _candidate_spans(text, lowered)
        if not spans:
            return text
        found = self._scan([text[start:end] for start, end in spans])
        pieces: list[str] = []
        everywhere: list[tuple[str, str]] = []
        last = 0
        for (start, end), secrets in zip(spans, found, strict=False):
            if not secrets:
                continue
            window = text[start:end]
            for kind, secret in secrets:
                window = _replace_outside_markers(window, secret, _marker(kind))
                if len(secret) >= _ECHO_MIN:
                    everywhere.append((kind, secret))
            pieces += [text[last:start], window]
            last = end
        if not pieces:
            return text
        pieces.append(text[last:])
        text = "".join(pieces)
        # A long secret echoed elsewhere goes too; a short one ("none", "admin") only where it was found.
        for kind, secret in everywhere:
            text = _replace_outside_markers(text, secret, _marker(kind))
        return text

    def _scan(self, windows: list[str]) -> list[list[tuple[str, str]]]:
        with self._lock:
            try:
                if self._config is None:
                    self._setup()
                from detect_secrets.settings import get_settings, transient_settings

                current = set(get_settings().plugins)
                if not current:  # nobody else's configuration is active: hold ours
                    self._held.enter_context(transient_settings(self._config))  # type: ignore[arg-type]
                    current = self._names
                if current == self._names:
                    return [_scan_window(window) for window in windows]
                with transient_settings(self._config):  # type: ignore[arg-type]
                    return [_scan_window(window) for window in windows]
            except Exception:
                if not self._error_logged:
                    self._error_logged = True
                    logger.exception(
                        "honed: detect-secrets failed; only honed's own rules apply (logged once)"
                    )
                return []

    def _setup(self) -> None:
        try:
            from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
        except ImportError:
            self._unavailable = True
            raise
        names = sorted(
            cls.__name__
            for cls in get_mapping_from_secret_type_to_class().values()
            if cls.__name__ not in _EXCLUDED_PLUGINS
        )
        self._names = set(names)
        self._config = {"plugins_used": [{"name": name} for name in names]}


def _candidate_spans(text: str, lowered: str) -> list[tuple[int, int]]:
    """Disjoint spans of `text` for detect-secrets: the line around each candidate, clipped.

    detect-secrets costs ~2 µs per character scanned, so each candidate brings at most ±_DS_WINDOW
    characters of its line, windows merge up to _DS_MAX_WINDOW, and one text gets at most
    _DS_MAX_CHARS scanned, head first (what a truncated field's preview shows).
    """
    candidates = [
        *_DS_LITERALS.finditer(text),
        *_anchored_matches(_DS_ASSIGNMENT, _DS_ANCHORS, text, lowered),
    ]
    spans: list[list[int]] = []
    scanned = 0
    for m in sorted(candidates, key=lambda m: m.start()):
        low = max(0, m.start() - _DS_WINDOW)
        newline = text.rfind("\n", low, m.start())
        start = newline + 1 if newline >= 0 else low
        high = min(len(text), m.end() + _DS_WINDOW)
        newline = text.find("\n", m.end(), high)
        end = newline if newline >= 0 else high
        if spans and start < spans[-1][1]:
            previous = spans[-1]
            if end - previous[0] <= _DS_MAX_WINDOW:
                grown = max(previous[1], end)
                scanned += grown - previous[1]
                previous[1] = grown
                continue
            start = previous[1]
            if start >= end:
                continue
        if scanned + (end - start) > _DS_MAX_CHARS:
            break
        spans.append([start, end])
        scanned += end - start
    return [(start, end) for start, end in spans]


def _scan_window(window: str) -> list[tuple[str, str]]:
    from detect_secrets.core.scan import scan_line

    found: list[tuple[str, str]] = []
    for secret in scan_line(window):
        value = secret.secret_value
        if not value or _MARKER_SPLIT.fullmatch(value):
            continue
        # Some plugins report a regex group, not the token (`ghp` for a GitHub token): extend the
        # value over the token characters that follow it, so the whole secret is replaced.
        at = window.find(value)
        if at >= 0:
            tail = _SECRET_TAIL.match(window, at + len(value))
            value = window[at : tail.end()] if tail else value
        kind = _KIND_BY_TYPE.get(secret.type) or _NON_WORD.sub("_", secret.type.lower()).strip("_")
        found.append((kind, value))
    return found


def _replace_outside_markers(text: str, secret: str, marker: str) -> str:
    parts = _MARKER_SPLIT.split(text)
    bounded = re.compile(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])")
    replaced = False
    for i in range(0, len(parts), 2):  # odd parts are markers already
        new, n = bounded.subn(marker, parts[i])
        if n:
            parts[i], replaced = new, True
    if not replaced:  # detect-secrets saw it inside a longer word: replace it there too
        for i in range(0, len(parts), 2):
            parts[i] = parts[i].replace(secret, marker)
    return "".join(parts)


_DETECT_SECRETS = _DetectSecrets()
