"""The detect-secrets adapter: the long tail of secret shapes that honed's own rules (`redact`) miss.

detect-secrets (without its HighEntropy plugins, which flag ordinary words) runs only on the few
lines that still look like a secret it knows, clipped to windows, because it costs ~2 µs per character
scanned and some of its regexes backtrack: each window is short and one text gets a bounded number of
characters scanned, so its cost stays linear in the text whatever the text holds.

    >>> DetectSecrets().redact("sendgrid: SG.aaaaaaaaaaaaaaaaaaaaaa.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb")
    'sendgrid: [REDACTED:sendgrid_api_key]'
"""

from __future__ import annotations

import atexit
import logging
import re
import threading
from contextlib import ExitStack
from typing import Any

from honed.redaction._textmatch import MARKER_SPLIT, NOT_REDACTED, after, anchored_matches, lower, marker

logger = logging.getLogger("honed")

# detect-secrets plugins left out: HighEntropy ones flag ordinary words ("hello"), and public IP
# addresses are not secrets (agents look them up all the time).
_EXCLUDED_PLUGINS = frozenset({"Base64HighEntropyString", "HexHighEntropyString", "IPPublicDetector"})
# detect-secrets scans ~2 µs per character: it sees each candidate's line clipped to ±_DS_WINDOW
# characters, windows merged up to _DS_MAX_WINDOW, and at most _DS_MAX_CHARS per text (~0.15 s).
# Its keyword regexes cost time quadratic in a word that holds many keywords (`\w*` affixes from each
# one: 2 s for 2 KB of "pwdpwd..."): such words are defused in the copy it scans (`_defuse`).
_DS_WINDOW = 512
_DS_MAX_WINDOW = 4096
_DS_MAX_CHARS = 65536
# A secret detect-secrets finds is replaced everywhere in the text only from this length on: shorter
# values ("none", "admin") would also hit ordinary words far from where they were found.
_ECHO_MIN = 12
# ... and only the first _ECHO_MAX distinct ones: each costs a pass over the whole text.
_ECHO_MAX = 32
# Joins the windows of one call. No pattern of detect-secrets matches across it: `.` and its secret
# pattern `[^\v'"]` stop at a line feed and a vertical tab, `\s*` at the NUL.
_SEPARATOR = "\n\x0b\x00\n"

# What detect-secrets finds that the rules in `redact` do not: vendor tokens with a literal prefix
# (SendGrid, Square, PyPI, npm, GitLab, Azure, Artifactory), anchored on rare characters ...
_DS_LITERALS = re.compile(
    r"-(?:(?<=pypi-)Ag|(?<=sq0csp-)|(?<=gl[a-z]{2}-)|(?<=gl[a-z]{3}-)|(?<=glagent-))"
    r"|_(?:(?<=k_live_)|(?<=npm_)|(?=authToken))"
    r"|SG\.[\w-]{20}|GR1348941|AccountKey=|AKC[A-Za-z0-9]{10}"
    # Twilio, Mailchimp, Telegram and Discord bot tokens, by shape (see `redact._ANCHORS`).
    r"|S(?=K[0-9a-fA-F]{32})|-(?=us[0-9])(?<=[0-9a-f]{32}-)|:(?=AA[0-9A-Za-z_-]{33})"
    r"|\.(?=[A-Za-z0-9_-]{6}\.[A-Za-z0-9_-]{27})(?:(?<=[MNO][A-Za-z0-9_-]{23}\.)|(?<=[MNO][A-Za-z0-9_-]{24}\.)"
    r"|(?<=[MNO][A-Za-z0-9_-]{25}\.))"
)
# ... and the quoted keyword assignments the rules left unredacted (`secrets = '...'`, `"x" == pwd`,
# `private_key "..." ;`), with detect-secrets' own keyword list; the value must start with a word
# character, as detect-secrets' regexes require. Every run is bounded, so that a text made of
# keywords ("passwordpassword...") costs a bounded scan per keyword, not one to the end of the run.
_DS_WORDS = (
    r"(?:passw|pwd|secret|contrase|"
    + after("api", "auth", "service", "account", "db", "database", "priv", "private", "client")
    + "key|"
    + after("db", "database", "key")
    + "pass)"
)
_NOT_REDACTED_LOWERED = NOT_REDACTED.lower()
_DS_ASSIGNMENT = re.compile(  # matched in the lowered text: `(?i)` costs more
    rf"{_DS_WORDS}\w{{0,64}}+[\\'\"\]]{{0,3}}\s{{0,32}}+(?:[=!:]=?=?|=>)\s{{0,32}}+@?\\?['\"`]"
    rf"{_NOT_REDACTED_LOWERED}\w"
    rf"|{_DS_WORDS}[^\s'\"`]{{0,50}}+\s{{0,32}}+['\"`]{_NOT_REDACTED_LOWERED}\w[^'\"`\n]{{0,{_DS_WINDOW}}}+['\"`];"
)
_DS_ANCHORS = ("passw", "pwd", "secret", "contrase", "key", "pass")
# Words longer than this that hold more than one of detect-secrets' keywords are defused.
_LONG_WORD = re.compile(r"\w{65,}")
_DS_KEYWORDS = re.compile(r"key|pass|pwd|secret|contrase")
_MAX_SLASHES = 16
_SECRET_TAIL = re.compile(r"[A-Za-z0-9_+/=.-]*")
_NON_WORD = re.compile(r"[^a-z0-9]+")
_KIND_BY_TYPE = {
    "Secret Keyword": "secret",
    "Basic Auth Credentials": "password",
    "OpenAI Token": "openai_key",
    "AWS Access Key": "aws_access_key",
    "JSON Web Token": "jwt",
}


class DetectSecrets:
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

    def redact(self, text: str, lowered: str | None = None) -> str:
        """`text` with what detect-secrets finds on its candidate lines replaced by `[REDACTED:<kind>]`."""
        if self._unavailable:
            return text
        if lowered is None:
            lowered = lower(text)
        spans = candidate_spans(text, lowered)
        if not spans:
            return text
        batches = _batches(spans)
        found = self._scan([_SEPARATOR.join(text[start:end] for start, end in batch) for batch in batches])
        pieces: list[str] = []
        everywhere: dict[str, str] = {}
        last = 0
        for batch, secrets in zip(batches, found, strict=False):
            if not secrets:
                continue
            for kind, secret in secrets:
                if len(secret) >= _ECHO_MIN and len(everywhere) < _ECHO_MAX:
                    everywhere.setdefault(secret, kind)
            # detect-secrets reports a value once per scan: replace it in every window of the batch.
            for start, end in batch:
                window = redacted = text[start:end]
                for kind, secret in secrets:
                    if secret in redacted:
                        redacted = _replace_outside_markers(redacted, secret, marker(kind))
                if redacted != window:
                    pieces += [text[last:start], redacted]
                    last = end
        if not pieces:
            return text
        pieces.append(text[last:])
        text = "".join(pieces)
        # A long secret echoed elsewhere goes too; a short one ("none", "admin") only where it was found.
        for secret, kind in everywhere.items():
            if secret in text:
                text = _replace_outside_markers(text, secret, marker(kind))
        return text

    def _scan(self, windows: list[str]) -> list[list[tuple[str, str]]]:
        """What detect-secrets finds in each window (windows of several lines joined by `_SEPARATOR`)."""
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
                    return [_scan_window(window, _defuse(window)) for window in windows]
                with transient_settings(self._config):  # type: ignore[arg-type]
                    return [_scan_window(window, _defuse(window)) for window in windows]
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


def candidate_spans(text: str, lowered: str) -> list[tuple[int, int]]:
    """Disjoint spans of `text` for detect-secrets: the line around each candidate, clipped.

    detect-secrets costs ~2 µs per character scanned, so each candidate brings at most ±_DS_WINDOW
    characters of its line, windows merge up to _DS_MAX_WINDOW, and one text gets at most
    _DS_MAX_CHARS scanned, head first (what a truncated field's preview shows).
    """
    candidates = [
        *_DS_LITERALS.finditer(text),
        *anchored_matches(_DS_ASSIGNMENT, _DS_ANCHORS, lowered, lowered),
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


def _batches(spans: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """`spans` in runs of at most _DS_MAX_WINDOW characters: one detect-secrets call each.

    A call costs ~200 µs before it reads a character: a text of many short candidate lines (an
    `.npmrc`, an env dump) would cost that per line.
    """
    batches: list[list[tuple[int, int]]] = []
    size = _DS_MAX_WINDOW + 1
    for start, end in spans:
        if size + len(_SEPARATOR) + end - start > _DS_MAX_WINDOW:
            batches.append([])
            size = -len(_SEPARATOR)
        batches[-1].append((start, end))
        size += len(_SEPARATOR) + end - start
    return batches


def _defuse(window: str) -> str:
    r"""`window` as detect-secrets should scan it: the same offsets, without the shapes it is slow on.

    detect-secrets' keyword regexes (`(password|pwd|...)\w*` then an operator) scan from each keyword
    to the end of its word and back: a 2 KB word of keywords costs seconds. In the copy it scans, each
    keyword of such a word after the first loses its first character to `~`, so its words stay short;
    what it finds is read back from `window` at the same offsets.
    """
    # Its secret pattern stops at ' and " but not at `, so each keyword followed by ` scans to the end
    # of the line and back: ` reads as ' (the regexes take both as quotes).
    window = window.replace("`", "'")
    # The npm plugin's `//.+/:_authToken` scans from each "//" to the end of the line and back: where
    # it cannot match, only the first few "//" stay.
    if window.count("//") > _MAX_SLASHES and "/:_authToken" not in window:
        head = -1
        for _ in range(_MAX_SLASHES):
            head = window.find("//", head + 2)
        window = window[: head + 2] + window[head + 2 :].replace("//", "/~")
    pieces: list[str] = []
    last = 0
    for word in _LONG_WORD.finditer(window):
        hits = [m.start() for m in _DS_KEYWORDS.finditer(word.group(0).lower())]
        if len(hits) < 2:
            continue
        chars = list(word.group(0))
        for at in hits[1:]:
            chars[at] = "~"
        pieces += [window[last : word.start()], "".join(chars)]
        last = word.end()
    if not pieces:
        return window
    pieces.append(window[last:])
    return "".join(pieces)


def _scan_window(window: str, scanned: str) -> list[tuple[str, str]]:
    """What detect-secrets finds in `scanned` (`window` or a copy at the same offsets), read in `window`."""
    from detect_secrets.core.scan import scan_line

    found: list[tuple[str, str]] = []
    for secret in scan_line(scanned):
        value = secret.secret_value
        if not value or MARKER_SPLIT.fullmatch(value):
            continue
        # Some plugins report a regex group, not the token (`ghp` for a GitHub token): extend the
        # value over the token characters that follow it, so the whole secret is replaced.
        at = scanned.find(value)
        if at >= 0:
            tail = _SECRET_TAIL.match(window, at + len(value))
            value = window[at : tail.end()] if tail else window[at : at + len(value)]
        kind = _KIND_BY_TYPE.get(secret.type) or _NON_WORD.sub("_", secret.type.lower()).strip("_")
        found.append((kind, value))
    return found


def _replace_outside_markers(text: str, secret: str, new: str) -> str:
    parts = MARKER_SPLIT.split(text)
    bounded = re.compile(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])")
    replaced = False
    for i in range(0, len(parts), 2):  # odd parts are markers already
        new_part, n = bounded.subn(new, parts[i])
        if n:
            parts[i], replaced = new_part, True
    if not replaced:  # detect-secrets saw it inside a longer word: replace it there too
        for i in range(0, len(parts), 2):
            parts[i] = parts[i].replace(secret, new)
    return "".join(parts)
