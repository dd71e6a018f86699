"""Secret redaction for captured runs, so trajectories can be stored, shared and trained on.

Three passes over each string, cheapest first, all on the writer thread:

1. a prefilter (one small regex and a few substring tests) that lets ordinary text through untouched;
2. honed's own regexes for the secrets agents handle most (provider keys, bearer and basic credentials,
   JWTs, URL passwords and tokens, PEM blocks, `password = ...` assignments, command-line passwords
   (`curl -u`, `--password`, `mysql -p...`), name/value pairs written as text); they replace the *whole* secret, where
   detect-secrets sometimes reports only a part of it (`ghp` for a GitHub token, a JWT without its
   signature, a PEM header without its body);
3. detect-secrets (`secret_scan`, without its HighEntropy plugins, which flag ordinary words) on the
   few lines that still look like a secret it knows: the long tail of vendor tokens and keyword
   assignments.

A secret becomes `[REDACTED:<kind>]`, e.g. `[REDACTED:openai_key]`. The user hook runs last.

Every pass is linear in the length of the text, hostile text included (`eyJeyJeyJ...`, runs of
keywords): a rule that scans a run of token characters may start only where that run starts, or scans
a bounded distance, or up to a character no other start of it can contain. `redact_capped` also cuts
text to a budget *before* redacting it, so a huge field costs what its stored head costs.

    >>> Redactor().redact_text("Authorization: Bearer abcDEF123456ghiJKL789")
    'Authorization: Bearer [REDACTED:bearer]'
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import logging
import re
import shlex
import threading
from collections.abc import Callable
from typing import Any

from honed.redaction._textmatch import NOT_REDACTED as _NOT_REDACTED
from honed.redaction._textmatch import after as _after
from honed.redaction._textmatch import anchored_matches as _anchored_matches
from honed.redaction._textmatch import lower as _lower
from honed.redaction._textmatch import marker as _marker
from honed.redaction.secret_scan import DetectSecrets

logger = logging.getLogger("honed")

_KEY_CACHE_SIZE = 4096
# Texts whose redaction is remembered: each up to 16 Ki characters, up to 2 Mi in all (then forgotten).
_TEXT_CACHE_MAX_CHARS = 16_384
_TEXT_CACHE_CHARS = 2_097_152
# The shortest text a rule can act on ("a://b:c@", "pwd=abc1"): shorter strings ("user", "7") skip it all.
_MIN_SECRET_TEXT = 8
# Base64 of at least 24 characters (18 bytes: `user:password`), its lines broken by newlines or by
# JSON's escaped `\n` (the GitHub contents API breaks at 60).
_MIN_BASE64 = 24
# Wrapped at any width, its lines indented (a YAML block scalar `data: |`: decoded line by line, a
# secret across a break was kept in part, a review, session 22).
_BASE64_RUN = re.compile(
    r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{24,}(?:(?:\r?\n|\\n)[ \t]*[A-Za-z0-9+/]{4,})*={0,2}(?![A-Za-z0-9+/=])"
)
_BASE64_BREAKS = re.compile(r"(?:\r?\n|\\n)[ \t]*")
_RUN_SEPARATOR = "\n\x00\n"  # between decoded runs redacted together: no rule reads across it


def _worth_redacting(text: str) -> bool:
    """What `_builtin` could change: text its prefilter lets through, or base64 again."""
    return _is_candidate(text, _lower(text)) or (
        len(text) >= _MIN_BASE64 and _BASE64_RUN.search(text) is not None
    )


def _decoded_text(run: str) -> tuple[int, str] | None:
    """The text a base64 run decodes to, and how much of the run it is: all of it, or, where
    the run took in the next line's first word (`...L3Byb2Qx\nDone`), the lines before it."""
    for end in (len(run), max(run.rfind("\n"), run.rfind("\\n"))):
        if end <= 0:
            return None
        packed = _BASE64_BREAKS.sub("", run[:end].rstrip("\r\\"))
        if len(packed) % 4 == 1:  # cut by the field cap: the whole quanta before it
            packed = packed[:-1]
        try:
            decoded = base64.b64decode(packed + "=" * (-len(packed) % 4), validate=True).decode("utf-8")
        except ValueError:  # binascii.Error and UnicodeDecodeError both are
            continue
        if not decoded.replace("\n", "").replace("\r", "").replace("\t", "").isprintable():
            continue  # binary that happens to be valid UTF-8, or a next line's word taken in
        return end, decoded
    return None


# `redact_capped` keeps this many characters past its limit before redacting, so that a secret that
# straddles the limit is seen whole (or, longer than this, by a prefix long enough for its rule).
CUT_MARGIN = 4096


class Redactor:
    """Replaces secrets in strings and in JSON-able data; never raises.

    Args:
        hook: runs last on every string value (after the built-in redaction) and returns its
            replacement; if it raises, the error is logged once and the built-in result is kept.
        use_detect_secrets: also run detect-secrets on candidate lines (slower, wider coverage).

    `redact` also replaces the whole value of dict keys that name a secret (`api_key`, `password`,
    `authorization`, `auth`, `credentials`, `secret_access_key`, `token`, `cookie`, `*_password`,
    `*_api_key`, `*_token`, `clientSecret`, ...; see `secret_key_kind`), whatever the value looks like,
    but not token *counts* (`tokens`, `input_tokens`, `max_tokens`, ...). A name can also sit beside
    its value: `{"name": "DB_PASSWORD", "value": ...}` (or `key`/`Key`, `Value`), and a 2-item pair in
    a list, `[["X-Api-Key", ...]]`; such a value is replaced the same way. Bytes previews
    (`{"__type__": "bytes", "base64": ...}`) that decode as UTF-8 are redacted as text, re-encoded.
    """

    def __init__(self, hook: Callable[[str], str] | None = None, *, use_detect_secrets: bool = True) -> None:
        self._hook = hook
        self._use_detect_secrets = use_detect_secrets
        self._hook_failure_logged = False
        self._error_logged = False
        # Keys repeat across every event ("role", "content", ...): decide each one once.
        self._keys: dict[str, tuple[str, str | None]] = {}
        # So do texts: a system prompt and tool descriptions in every run, a tool's result in its
        # step and again in the next model call's messages. The built-in rules are a function of
        # the text alone, so each is decided once (the hook, which may not be, runs every time).
        self._texts: dict[str, str] = {}
        self._text_chars = 0

    def redact_text(self, text: str) -> str:
        """`text` with every secret found replaced by `[REDACTED:<kind>]`, then the hook applied."""
        if not isinstance(text, str):
            return text
        out = self._texts.get(text) if len(text) >= _MIN_SECRET_TEXT else text
        if out is None:
            try:
                out = self._builtin(text)
            except Exception:  # never store text the redactor could not vouch for
                self._log_error()
                out = _marker("error")
            else:
                self._remember(text, out)
        if self._hook is not None and not _in_json_text.on:
            out = self._apply_hook(out)
        return out

    def redact_id(self, text: str) -> str:
        """An id or a name (a thread's, a task's, a tool call's) with the built-in rules only: the
        hook rewrites text for people, and an id it rewrote no longer finds its runs, nor the
        held-out task it names (a review, session 23: the README's own hook did both)."""
        if not isinstance(text, str) or len(text) < _MIN_SECRET_TEXT:
            return text
        out = self._texts.get(text)
        if out is None:
            try:
                out = self._builtin(text)
            except Exception:
                self._log_error()
                return _marker("error")
            self._remember(text, out)
        return out

    def redact(self, value: Any) -> Any:
        """A copy of JSON-able `value` with every string redacted and secret-named keys' values replaced."""
        try:
            return self._walk(value)
        except Exception:  # e.g. a cycle in hand-built data: RecursionError
            self._log_error()
            return _marker("error")

    def redact_capped(self, value: Any, limit: int) -> tuple[Any, bool]:
        """`redact(value)` of only its head, and whether anything was cut.

        Strings (dict keys and values, in JSON order) are kept up to `limit + CUT_MARGIN` characters in
        all and cut *before* they are redacted; what comes after is dropped. A JSON text of the result
        therefore agrees with the redacted original over at least its first `limit` bytes, and costs
        what those cost, however large `value` is.
        """
        budget = _Budget(limit + CUT_MARGIN)
        try:
            return self._walk_capped(value, budget), budget.cut
        except Exception:
            self._log_error()
            return _marker("error"), budget.cut

    def names_a_secret(self, value: Any) -> bool:
        """Whether `redact(value)` (a dict, list or tuple) replaces more than its strings and its keys'
        values one by one: a value named by its sibling, or a bytes preview."""
        t = type(value)
        if t is dict:
            return (
                _is_bytes_preview(value) or _is_secret_object(value) or self._named_entry(value) is not None
            )
        if t is list or t is tuple:
            pair = self._named_pair
            for item in value:
                if (type(item) is list or type(item) is tuple) and len(item) == 2 and pair(item):
                    return True
            return self._argv(value) is not None
        return False

    def _argv(self, value: list[Any] | tuple[Any, ...]) -> list[str] | None:
        """A command as an argv list (`["mysql", "-u", "root", "-pPW"]`, `["psql", "--password",
        "PW"]`), redacted as its command line is, when that finds a secret its items alone hide;
        else None. The items are split back; where they cannot be, the redacted line's words."""
        if not 2 <= len(value) <= _MAX_ARGV:
            return None
        dashed = False
        for item in value:
            if type(item) is not str or len(item) > _MAX_ARG:
                return None
            dashed = dashed or item[:1] == "-"
        if not dashed:
            return None
        items = [self.redact_text(item) for item in value]
        line = shlex.join(items)
        redacted = self.redact_text(line)
        if redacted == line:
            return None
        try:
            return shlex.split(redacted)
        except ValueError:  # unbalanced quotes after redaction: the line, whole
            return [redacted]

    def _walk(self, value: Any, named: bool = True) -> Any:
        """`value` redacted; with `named` False, dict keys are not taken as naming their values."""
        t = type(value)
        if t is str:
            return self.redact_text(value)
        if t is dict:
            if _is_bytes_preview(value):
                return self._bytes_preview(value, value["base64"])
            # {"name": "DB_PASSWORD", "value": ...}: the value key, and the kind its sibling names.
            entry = self._named_entry(value) if named else None
            manifest = _is_secret_object(value)
            out: dict[Any, Any] = {}
            for key, item in value.items():
                new_key, kind = self.redact_key(key) if type(key) is str else (key, None)
                if new_key in out:  # two keys redacted alike: both kept
                    new_key = _free_key(out, new_key)
                if manifest and key in _SECRET_DATA_KEYS and type(item) is dict:
                    out[new_key] = {k: _marker("secret") for k in item}
                elif named and kind is not None and _holds_secret(item, key):
                    out[new_key] = _marker(kind)
                elif entry is not None and key == entry[0]:
                    out[new_key] = _marker(entry[1])
                elif key == "properties" and type(item) is dict and value.get("type") == "object":
                    # A JSON schema's (a tool's parameters): its keys are parameter names, and their
                    # values are schemas, not secrets. What the schemas hold is redacted as usual,
                    # and a secret-named parameter's example values (`default`, `enum`) go.
                    out[new_key] = {
                        self.redact_key(k)[0] if type(k) is str else k: self._walk(
                            self._schema_examples(k, v)
                        )
                        for k, v in item.items()
                    }
                else:
                    out[new_key] = self._walk(item)
            return out
        if t is list or t is tuple:
            argv = self._argv(value) if value and type(value[0]) is str else None
            if argv is not None:
                return argv
            pair = self._named_pair
            return [
                self._walk_pair(item, kind)
                if (type(item) is list or type(item) is tuple) and len(item) == 2 and (kind := pair(item))
                else self._walk(item)
                for item in value
            ]
        return value

    def _schema_examples(self, name: Any, schema: Any) -> Any:
        """A secret-named parameter's schema with the values it offers (`default`, `enum`, `const`,
        `examples`) replaced: `{"password": {"type": "string", "default": "hunter2"}}`."""
        kind = self._name_kind(name) if type(name) is str and type(schema) is dict else None
        if kind is None:
            return schema
        out = dict(schema)
        for k in _SCHEMA_EXAMPLES.intersection(schema):
            v = schema[k]
            if type(v) is list:  # `enum` and `examples` stay lists
                out[k] = [_marker(kind) if _offered_secret(item, name) else item for item in v]
            elif _offered_secret(v, name):
                out[k] = _marker(kind)
        return out

    def _walk_pair(self, pair: list[Any] | tuple[Any, ...], kind: str) -> list[Any]:
        return [self.redact_text(pair[0]), _marker(kind)]

    def _named_entry(self, entry: dict[Any, Any]) -> tuple[str, str] | None:
        """The value's key and the secret kind its sibling names, for `{"name": "DB_PASSWORD",
        "value": ...}` (also `key`, `Name`, `Key`; `Value`); None for any other dict."""
        value_key = "value" if "value" in entry else "Value" if "Value" in entry else None
        if value_key is None:
            return None
        value = entry[value_key]
        # A label's or a type's entry may describe a setting in words ("Shown once after
        # creation", a form's "Min 12 characters"): its value is a secret only as one word.
        worded = type(value) is str and any(c.isspace() for c in value.strip())
        for name_key in _ENTRY_NAME_KEYS:
            name = entry.get(name_key)
            if type(name) is str and not (worded and name_key in _ENTRY_LABEL_KEYS):
                kind = self._name_kind(name)
                if kind is not None and _holds_secret(value, name):
                    return value_key, kind
        if worded:
            return None
        # A vault's own word for it: 1Password's `"type": "CONCEALED"`, AWS SSM's `"SecureString"`.
        for type_key in _ENTRY_TYPE_KEYS:
            said = entry.get(type_key)
            if type(said) is str and said.lower() in _SECRET_TYPES and _holds_secret(value, "secret"):
                return value_key, "secret"
        return None

    def _named_pair(self, pair: list[Any] | tuple[Any, ...]) -> str | None:
        """The secret kind a 2-item pair's name gives its value (`["X-Api-Key", "..."]`), else None."""
        name = pair[0]
        if type(name) is not str:
            return None
        kind = self._name_kind(name)
        return kind if kind is not None and _holds_secret(pair[1], name) else None

    def _name_kind(self, name: str) -> str | None:
        # A name is short: a long string beside a value is text, and must not fill the key cache.
        return self.redact_key(name)[1] if len(name) <= _MAX_NAME else None

    def _bytes_preview(self, preview: dict[Any, Any], encoded: str) -> dict[Any, Any]:
        """A bytes preview whose text (when the bytes decode as UTF-8) is redacted, then re-encoded.

        The serialiser stores bytes as base64, which no rule can read: a `.env` file read in binary
        mode would be stored whole. Binary data is kept as it is.
        """
        out = {key: self._walk(item) for key, item in preview.items() if key != "base64"}
        text = _utf8_text(encoded)
        if text is not None:
            redacted = self.redact_text(text)
            if redacted != text:
                encoded = base64.b64encode(redacted.encode("utf-8", "surrogatepass")).decode("ascii")
        out["base64"] = encoded
        return out

    def _walk_capped(self, value: Any, budget: _Budget, named: bool = True) -> Any:
        """`_walk` that takes each string's characters from `budget`, and stops when it is spent."""
        t = type(value)
        if t is str:
            return self.redact_text(budget.take(value))
        if t is dict:
            if _is_bytes_preview(value):
                # Cut to whole base64 quanta, so the head decodes; the rest of the preview is small.
                encoded = budget.take(value["base64"])
                return self._bytes_preview(value, encoded[: len(encoded) - len(encoded) % 4])
            entry = self._named_entry(value) if named else None
            manifest = _is_secret_object(value)
            out: dict[Any, Any] = {}
            for key, item in value.items():
                if budget.left <= 0:
                    budget.cut = True
                    break
                new_key, kind = self.redact_key(budget.take(key)) if type(key) is str else (key, None)
                if new_key in out:
                    new_key = _free_key(out, new_key)
                if manifest and key in _SECRET_DATA_KEYS and type(item) is dict:
                    out[new_key] = {budget.take(k) if type(k) is str else k: _marker("secret") for k in item}
                elif named and kind is not None and _holds_secret(item, key):
                    out[new_key] = budget.take(_marker(kind))
                elif entry is not None and key == entry[0]:
                    out[new_key] = budget.take(_marker(entry[1]))
                elif key == "properties" and type(item) is dict and value.get("type") == "object":
                    properties = {k: self._schema_examples(k, v) for k, v in item.items()}
                    out[new_key] = self._walk_capped(properties, budget, named=False)
                else:
                    out[new_key] = self._walk_capped(item, budget)
            return out
        if t is list or t is tuple:
            argv = self._argv(value) if value and type(value[0]) is str else None
            if argv is not None:
                return [budget.take(item) for item in argv]
            items: list[Any] = []
            for item in value:
                if budget.left <= 0:
                    budget.cut = True
                    break
                kind = (
                    self._named_pair(item)
                    if (type(item) is list or type(item) is tuple) and len(item) == 2
                    else None
                )
                if kind is not None:
                    items.append([self.redact_text(budget.take(item[0])), budget.take(_marker(kind))])
                else:
                    items.append(self._walk_capped(item, budget))
            return items
        return value

    def _remember(self, text: str, redacted: str) -> None:
        if len(text) > _TEXT_CACHE_MAX_CHARS:
            return
        if self._text_chars + len(text) > _TEXT_CACHE_CHARS:
            self._texts.clear()
            self._text_chars = 0
        self._texts[text] = redacted
        self._text_chars += len(text)

    def redact_key(self, key: str) -> tuple[str, str | None]:
        """A dict key redacted (built-in rules, then the hook), and the secret kind it names, if any.
        The hook runs on keys too: `honed serve`'s own keys sent as a metadata key were stored
        (a QA pass, session 22)."""
        known = self._keys.get(key)
        if known is None:
            if len(self._keys) >= _KEY_CACHE_SIZE:
                self._keys.clear()
            try:
                redacted = self._builtin(key)
            except Exception:
                self._log_error()
                redacted = _marker("error")
            known = (redacted, secret_key_kind(key))
            self._keys[key] = known
        if (
            self._hook is not None and not _in_json_text.on
        ):  # (not remembered: a hook may not give the same answer twice)
            return self._apply_hook(known[0]), known[1]
        return known

    def redact_named(self, kind: str, value: Any, key: str = "") -> Any:
        """The redacted value (JSON-able) of `key`, a key naming a secret of `kind`: its marker, unless
        the value is empty or a flag (`"auth": False`), or not text under a `pass` (`"pass": 3`)."""
        return _marker(kind) if _holds_secret(value, key) else self.redact(value)

    def _builtin(self, text: str) -> str:
        if len(text) < _MIN_SECRET_TEXT:
            return text
        if len(text) >= _MIN_BASE64 and _BASE64_RUN.search(text) is not None:
            text = self._base64_runs(text)
        lowered = _lower(text)
        if not _is_candidate(text, lowered):
            return text
        if len(text) <= _MAX_JSON_TEXT and text.lstrip()[:1] in ("{", "[") and _STRUCTURED.search(text):
            structured = self._json_text(text)
            if structured is not None:
                # Every string of it was redacted by the rules, its structure by the walk: done.
                return text if structured is _UNCHANGED else structured
        if "\\u00" in text:
            # Punctuation escaped as JSON escapes it for HTML (Gson's default, `\u003d` for `=`,
            # `\u0026` for `&`): the rules see the separators a secret sits behind (a QA pass,
            # session 27: `api_key\u003d...` in a Java service's answer was kept).
            plain = _ESCAPED_PUNCTUATION.sub(lambda m: chr(int(m.group(1), 16)), text)
            if plain != text:
                redacted = self._rules(plain, _lower(plain))
                return text if redacted == plain else redacted
        return self._rules(text, lowered)

    def _rules(self, text: str, lowered: str) -> str:
        for rule in _RULES:
            redacted = rule.apply(text, lowered)
            if redacted is not text:
                text, lowered = redacted, _lower(redacted)
        if "\n" in text:
            text = _table_columns(text, lowered)
        text = _named_lines(text)
        if self._use_detect_secrets:
            text = _DETECT_SECRETS.redact(text, lowered)
        return text

    def _json_text(self, text: str) -> str | None:
        """JSON text (a tool's dict, as LangChain hands it on; a queue message's body) redacted as
        the value it holds, then written again, if that changed it: what only its structure says
        (a vault entry's `"type": "CONCEALED"`, a key in another language, a copy's qualifier)
        holds in text too, and JSON held in its strings is read the same way, to any depth (a
        review, session 23). None when it is not JSON, or nothing changed."""
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return None
        if not isinstance(value, dict | list):
            return None
        # The hook runs once, on the whole text, after the built-in rules (not here too).
        outer, _in_json_text.on = _in_json_text.on, True
        try:
            redacted = self._walk(value)
            return _UNCHANGED if redacted == value else json.dumps(redacted, ensure_ascii=False)
        except RecursionError:  # nested deeper than the walk goes: the text rules read it
            return None
        finally:
            _in_json_text.on = outer

    def _base64_runs(self, text: str) -> str:
        """Base64 runs that decode to text (a file from GitHub's contents API, a Kubernetes
        secret's value, `.npmrc`'s `_auth`) holding a secret: the redacted text, re-encoded. The
        decoded runs are redacted together, in one pass: one by one, 2,000 short runs in a field
        cost 100x the field (a review, session 21)."""
        runs: list[tuple[int, int, str]] = []  # where each decoded part is, and its text
        for m in _BASE64_RUN.finditer(text):
            part = _decoded_text(m.group(0))
            if part is not None and _worth_redacting(part[1]):
                runs.append((m.start(), m.start() + part[0], part[1]))
        if not runs:
            return text
        joined = _RUN_SEPARATOR.join(decoded for _, _, decoded in runs)
        redacted = self._builtin(joined)
        if redacted == joined:
            return text
        pieces = redacted.split(_RUN_SEPARATOR)
        if len(pieces) != len(runs):  # a rule reached across a separator: one run at a time
            pieces = [self._builtin(decoded) for _, _, decoded in runs]
        out: list[str] = []
        last = 0
        for (start, end, decoded), piece in zip(runs, pieces, strict=True):
            if piece != decoded:
                out.append(text[last:start])
                out.append(base64.b64encode(piece.encode("utf-8")).decode("ascii"))
                last = end
        out.append(text[last:])
        return "".join(out)

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


class _Budget:
    """How many characters of string content `Redactor.redact_capped` may still keep."""

    __slots__ = ("cut", "left")

    def __init__(self, left: int) -> None:
        self.left = left
        self.cut = False

    def take(self, text: str) -> str:
        if len(text) > self.left:
            text = text[: max(self.left, 0)]
            self.cut = True
        self.left -= len(text)
        return text


_SCHEMA_EXAMPLES = frozenset(("default", "enum", "const", "examples", "example"))


def _offered_secret(value: Any, name: str) -> bool:
    """An offered value that is a secret: any, but under a name as loose as `auth` or `pass`
    (`"auth": {"enum": ["oauth2", "basic"]}` offers modes), one with a credential's shape."""
    if type(value) is int and not isinstance(value, bool):
        return True  # a numeric passcode
    if type(value) is not str or not _holds_secret(value, name):
        return False
    return _credential_shaped(value) if name.lower().strip("_-") in ("auth", "pass") else True


def _holds_secret(value: Any, name: str = "") -> bool:
    """Whether a secret-named key's value is worth replacing: not empty, not a flag (`"auth": False`).

    Under a name ending in `pass` (`pass`, `DB_PASS`) only text that is not a verdict is:
    `{"pass": 3, "fail": 1}` is a tally, `{"pass": "yes"}` a verdict.
    """
    if value is None or value == "" or type(value) is bool:
        return False
    if name.lower() == "pin" and type(value) not in (str, int):
        return False  # a map's pin (`{"pin": {"lat": ...}}`), not a PIN
    if name[-4:].lower() != "pass":
        return True
    return type(value) is str and value.lower() not in _VERDICTS


_VERDICTS = frozenset(("yes", "no", "true", "false", "y", "n", "ok", "none", "null", "pass", "fail", "n/a"))


# Where a dict names its own value: `{"name": "DB_PASSWORD", "value": ...}` (Kubernetes env, AWS tags).
_ENTRY_NAME_KEYS = ("name", "key", "Name", "Key", "label", "Label", "id")
_ENTRY_LABEL_KEYS = frozenset(("label", "Label", "id"))
_ENTRY_TYPE_KEYS = ("type", "Type", "purpose", "kind")
_SECRET_TYPES = frozenset(("concealed", "password", "securestring", "secret", "masked"))
# The longest string taken as a name beside a value: names of secrets are short.
_MAX_NAME = 128
_MAX_JSON_TEXT = 1 << 20  # JSON text read as its value up to this long (the field cap is 64 KiB)
# JSON text whose structure may say what its text rules cannot: a named value (a vault entry), a
# key in another script, JSON in JSON past the rules' three levels of escaping.
_STRUCTURED = re.compile(
    r'"[Vv]alue"|[^\x00-\x7f]|\\{7}|\\u00[2-7][0-9a-fA-F]|(?i:(?:[_-]|[a-z](?=[A-Z]))?'
    r'(?:hex|json|b64|base64|pem|der|phrase|codes?|confirm\w*|again|repeat\w*|retype\w*|new|old|current|priv_?key)\\?")'
)
_UNCHANGED = "\x00unchanged"


class _JsonTextFlag(threading.local):
    on = False


_in_json_text = _JsonTextFlag()
_MAX_ARGV, _MAX_ARG = 256, 4096  # an argv list read as its command line: at most this many, this long


def _is_bytes_preview(value: dict[Any, Any]) -> bool:
    return "base64" in value and value.get("__type__") == "bytes" and type(value["base64"]) is str


def _utf8_text(encoded: str) -> str | None:
    """The text a bytes preview holds, or None when it is not UTF-8 text (or not base64)."""
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        # The preview may end inside a character: text up to it, if that is the only fault.
        if error.start < len(data) - 3 or error.reason != "unexpected end of data":
            return None
        return data[: error.start].decode("utf-8")


# --- Keys that name a secret -------------------------------------------------------------------------

# Keys are split into lowercase words (snake_case, kebab-case, camelCase, "Spaced Words") and looked up
# by their words run together ("x-api-key", "xApiKey" and "X_API_KEY" are all "xapikey") ...
_SECRET_KEYS = {
    **dict.fromkeys(
        ("password", "passwd", "pwd", "pw", "passphrase", "passcode", "dbpassword", "pass", "pword", "passw"),
        "password",
    ),
    **dict.fromkeys(
        ("rootpw", "rootpass", "dbpass", "dbpw", "adminpass", "adminpw", "motdepasse", "pgpass"), "password"
    ),
    **dict.fromkeys(("mnemonicphrase", "seedphrase", "totp", "totpseed", "otpseed", "mfaseed"), "secret"),
    # One-time and card codes, PINs (a QA pass, session 24: a login tool's `otp` and `pin_code` were stored).
    **dict.fromkeys(
        ("pin", "pincode", "pinnumber", "otp", "otpcode", "totpcode", "mfacode", "twofactorcode", "tfacode"),
        "password",
    ),
    **dict.fromkeys(("cvv", "cvv2", "cvc", "cvc2", "cardcvv", "cardcvc", "cardsecuritycode"), "password"),
    # ... and the card's number (a QA pass, session 28: `card_number` was stored, its `cvv` not).
    **dict.fromkeys(
        (
            "cardnumber",
            "creditcardnumber",
            "ccnumber",
            "cardno",
            "ccnum",
            "creditcard",
            "primaryaccountnumber",
        ),
        "card_number",
    ),
    "bearer": "bearer",
    **dict.fromkeys(("apikey", "xapikey", "apitoken", "xgoogapikey"), "api_key"),
    **dict.fromkeys(("authorization", "proxyauthorization", "auth", "xauth", "basicauth"), "authorization"),
    **dict.fromkeys(("secret", "clientsecret", "secretkey", "appsecret", "accesskeysecret"), "secret"),
    # Azure: a storage account's key, a Service Bus / Event Hubs key, an API Management subscription.
    **dict.fromkeys(("accountkey", "sharedaccesskey", "subscriptionkey", "ocpapimsubscriptionkey"), "secret"),
    **dict.fromkeys(("privatekey", "sshprivatekey"), "private_key"),
    **dict.fromkeys(("cookie", "setcookie", "cookies"), "cookie"),
    **dict.fromkeys(
        ("awssecretaccesskey", "awssecretkey", "awssessiontoken", "secretaccesskey"), "aws_secret_key"
    ),
    **dict.fromkeys(("credentials", "credential", "creds"), "credentials"),
    **dict.fromkeys(
        (
            "token",
            "accesstoken",
            "refreshtoken",
            "idtoken",
            "authtoken",
            "bearertoken",
            "sessiontoken",
            "csrftoken",
            "xauthtoken",
            "xaccesstoken",
            "privatetoken",
            "personalaccesstoken",
        ),
        "token",
    ),
}
# ... then by their last word or two ("db_password", "stripe_api_key", "webhook_secret", "github_token").
_LAST_WORD = {
    **dict.fromkeys(("password", "passwd", "pwd", "pw", "passphrase", "passcode", "pass"), "password"),
    **dict.fromkeys(("passwords", "passphrases", "passcodes", "pword", "passw"), "password"),
    # ... in other languages (German, Spanish, Portuguese, Dutch, Polish, Swedish, Finnish, Russian,
    # Chinese, Japanese, Korean; French `mot_de_passe` by its words run together).
    **dict.fromkeys(
        (
            "passwort",
            "kennwort",
            "contraseña",
            "contrasena",
            "senha",
            "wachtwoord",
            "hasło",
            "haslo",
            "lösenord",
            "losenord",
            "salasana",
            "пароль",
            "密码",
            "密碼",
            "パスワード",
            "비밀번호",
        ),
        "password",
    ),
    **dict.fromkeys(("privkey", "privkeys"), "private_key"),
    **dict.fromkeys(
        ("secret", "secretkey", "clientsecret", "secrets", "secretkeys", "clientsecrets"), "secret"
    ),
    **dict.fromkeys(("apikey", "apikeys"), "api_key"),
    **dict.fromkeys(("privatekey", "privatekeys"), "private_key"),
    **dict.fromkeys(("credentials", "credential", "creds"), "credentials"),
    **dict.fromkeys(("authorization", "auth"), "authorization"),
    **dict.fromkeys(("cookie", "cookies"), "cookie"),
}
_LAST_WORDS = {
    ("secret", "access", "key"): "aws_secret_key",
    ("api", "key"): "api_key",
    ("api", "keys"): "api_key",
    ("private", "key"): "private_key",
    ("private", "keys"): "private_key",
    ("secret", "key"): "secret",
    ("secret", "keys"): "secret",
    ("signing", "key"): "secret",
    ("encryption", "key"): "secret",
    ("master", "key"): "secret",
    ("session", "key"): "secret",
    ("client", "secret"): "secret",
    ("priv", "key"): "private_key",
    ("wallet", "key"): "private_key",
    ("secret", "phrase"): "secret",
    ("recovery", "phrase"): "secret",
    ("seed", "phrase"): "secret",
    ("mot", "de", "passe"): "password",
    **dict.fromkeys(
        (
            ("pin", "code"),
            ("pin", "number"),
            ("otp", "code"),
            ("totp", "code"),
            ("mfa", "code"),
            ("mfa", "token"),
        ),
        "password",
    ),
    **dict.fromkeys(
        (("recovery", "code"), ("recovery", "codes"), ("backup", "code"), ("backup", "codes")), "secret"
    ),
    **dict.fromkeys((("auth", "header"), ("authorization", "header")), "authorization"),
    ("stripe", "sk"): "api_key",  # Stripe's secret key, as environments name it
    ("label", "key"): "api_key",  # `honed serve --label-key`: whoever holds it labels runs
}
# `*_token` names a secret, except these: a tokenizer's special tokens and pagination cursors.
_PUBLIC_TOKENS = frozenset(
    (
        "eos",
        "bos",
        "pad",
        "unk",
        "sep",
        "cls",
        "mask",
        "eot",
        "start",
        "end",
        "stop",
        "special",
        "added",
        "image",
        "audio",
        "video",
        "tool",
        "think",
        "next",
        "prev",
        "previous",
        "page",
        "pagination",
        "continuation",
        "cursor",
        "sync",
        "max",
        "min",
        "num",
        "total",
        "count",
    )
)
# ... and, run together, by how they end ("OPENAIAPIKEY", "dbpassword").
_ENDINGS = (
    ("secretaccesskey", "aws_secret_key"),
    ("password", "password"),
    ("passwd", "password"),
    ("apikey", "api_key"),
    ("privatekey", "private_key"),
    ("clientsecret", "secret"),
    ("secretkey", "secret"),
    ("accesstoken", "token"),
    ("refreshtoken", "token"),
    ("authtoken", "token"),
)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_NOT_WORD = re.compile(r"[\W_]+")
_NUMBERED = re.compile(r"(?<=[^\W\d_])\d+$")
_QUALIFIED_KINDS = frozenset(
    ("password", "private_key", "api_key", "aws_secret_key", "secret", "credentials")
)
_BARE = frozenset((("pass",), ("pw",), ("pwd",), ("token",), ("auth",), ("key",)))
# A last word that says something of the secret before it, not another thing.
_QUALIFIERS = frozenset(
    (
        "confirmation", "confirm", "confirmed", "again", "repeat", "repeated", "retype", "retyped", "verify",
        "verification", "new", "old", "current", "previous", "plain", "plaintext", "clear",
        "cleartext", "raw", "value", "hash", "hashed", "encrypted", "digest", "text", "hex", "b64", "base64",
        "pem", "der", "json", "data", "bytes", "str", "string", "material", "initial", "temp", "tmp",
    )
)  # fmt: skip


# `<vendor>_key` in any case names an API key (an environment's `<NAME>_KEY` does in upper case).
_KEY_VENDORS = frozenset(
    (
        "openai", "anthropic", "stripe", "mailgun", "sendgrid", "twilio", "license", "master", "app",
        "jwt", "hmac", "aes", "gemini", "google", "groq", "mistral", "cohere", "deepseek", "together", "fireworks",
        "replicate", "pinecone", "algolia", "cloudflare", "datadog", "github", "gitlab", "slack", "azure",
        "signing", "encryption", "webhook", "mapbox", "postmark", "pusher", "firebase", "supabase", "service",
    )
)  # fmt: skip


def secret_key_kind(key: str) -> str | None:
    """The redaction kind of a dict key that names a secret (`"OPENAI_API_KEY"` -> `"api_key"`), else None.

    Token *counts* (`tokens`, `input_tokens`, `max_tokens`), a tokenizer's special tokens (`eos_token`)
    and pagination cursors (`next_page_token`) are not secrets and give None.
    """
    # Unicode words ("contraseña", "пароль"), a trailing number off each ("password2", "pass1").
    words = tuple(
        w if w in _QUALIFIERS or (w.startswith("pass") and len(w) <= 5) else _NUMBERED.sub("", w)
        for w in _NOT_WORD.split(_CAMEL.sub("_", key[:200]).lower())
        if w
    )
    while len(words) > 1 and words[-1].isdigit():
        words = words[:-1]  # `API_KEY_1`, `DB_PASSWORD_2`: the second of its kind
    return _words_kind(words)


def _words_kind(words: tuple[str, ...]) -> str | None:
    if not words:
        return None
    if len(words) >= 2 and words[-1] in _QUALIFIERS and words[:-1] not in _BARE:
        # What is said of a secret is that secret: `password_confirmation`, `password_again`,
        # `private_key_hex`, `credentials_json` (a QA pass, session 23: a sign-up form's second
        # copy); of a password, a key or a secret only (`token_str` is a tokenizer's).
        kind = _words_kind(words[:-1])
        return kind if kind in _QUALIFIED_KINDS else None
    kind = _SECRET_KEYS.get("".join(words)) or _LAST_WORD.get(words[-1])
    if kind is not None:
        return kind
    for size in (3, 2):
        kind = _LAST_WORDS.get(words[-size:]) if len(words) >= size else None
        if kind is not None:
            return kind
    if len(words) >= 2 and words[-1] == "token" and words[-2] not in _PUBLIC_TOKENS:
        return "token"
    if words[-3:] == ("secret", "key", "base"):
        return "secret"  # Rails' `SECRET_KEY_BASE`
    if (
        len(words) >= 2
        and words[-1] == "key"
        and f"{words[-2]}_" not in _NOT_SECRET_KEYS
        and (words[-2] in _KEY_VENDORS or words[-3:-1] == ("azure", "storage"))
    ):
        return "api_key"  # `OPENAI_KEY`, `stripe_key`, and an environment's `<NAME>_KEY`
    joined = "".join(words)
    for ending, ending_kind in _ENDINGS:
        if joined.endswith(ending):
            return ending_kind
    return None


# --- Prefilter ---------------------------------------------------------------------------------------

# Branches start on characters rare in prose ('-', '_', capitals, ':') and check the rest with
# lookarounds: CPython's `re` tries every branch at every position, so a plain alternation of these
# candidates costs ~100 µs per 250 characters, this one ~1.5 µs.
_ANCHORS = re.compile(
    r"-(?:(?<=sk-)|(?<=xox[abposre]-)|(?<=xapp-)|(?<=pypi-)|(?<=sq0csp-)|(?<=gl[a-z]{2}-)|(?<=gl[a-z]{3}-)"
    r"|(?<=glagent-)|(?=----BEGIN)|(?<=\s-)[puaPwSU]|-(?:user|pass))"
    r"|-(?:(?<=tvly-)|(?<=xai-)|(?<=pplx-)|(?<=nvapi-))"
    r"|_(?:(?<=gh[pousr]_)|(?<=github_pat_)|(?<=k_live_)|(?<=k_test_)|(?<=whsec_)|(?<=hf_)|(?<=npm_)"
    r"|(?<=lsv2_)|(?<=gsk_)|(?<=do[por]_)|(?<=shp(?:at|ca|pa|ss)_)"
    r"|(?=authToken))"
    # Vault `hvs.`, Google OAuth `ya29.` and refresh `1//0...` tokens, Discord webhooks, and signed
    # URLs' `sig=` (Azure SAS) and `X-Amz-Signature=` / `X-Goog-Signature=`.
    r"|\.(?:(?<=hv[sbr]\.)|(?<=ya29\.))|/(?:(?<=1//)(?=0)|(?<=/api/)(?=webhooks/))"
    r"|=(?:(?<=sig=)|(?<=Signature=)|(?<=signature=))"
    r"|A(?:KIA|SIA|BIA|CCA|3T|Iza|KC|ccountKey)|PRIVATE KEY|GR1348941|SG\.|J(?<=eyJ)"
    r"|:(?:(?=//[^\s/?#@]*@)|(?=AA[0-9A-Za-z_-]{30})|(?=//hooks\.slack\.com/)"
    # a `.pgpass` line (`host:port:db:user:PASSWORD`)
    r"|(?=(?:\d{1,5}|\*):[^\s:]+:[^\s:]+:[^\s:]))"
    # a crypt(3) hash (`$apr1$`, `$2b$`, `$6$`, `$y$`, `$argon2id$`)
    r"|\$(?=(?:apr1|2[abxy]|1|5|6|7|y|gy|argon2(?:id|i|d))\$)|%(?:(?<=sk%)(?=2[Dd])|(?=3[Aa]%2[Ff]%2[Ff]))"
    # Vendor tokens detect-secrets knows by shape: Twilio `SK` + 32 hex, Mailchimp `<32 hex>-us<N>`,
    # Discord bot tokens (`<24-26>.<6>.<27+>`); Telegram's `<id>:AA...` is the `:` branch above.
    r"|S(?=K[0-9a-fA-F]{32})|-(?=us[0-9])(?<=[0-9a-f]{32}-)"
    r"|\.(?=[A-Za-z0-9_-]{6}\.[A-Za-z0-9_-]{27})(?:(?<=[MNO][A-Za-z0-9_-]{23}\.)|(?<=[MNO][A-Za-z0-9_-]{24}\.)"
    r"|(?<=[MNO][A-Za-z0-9_-]{25}\.))"
    # A name/value entry or pair written as text, named by no keyword below: `'DB_PASS', '...'`, `("auth",`.
    # (A branch must not start on a character class: `re` then tries it at every position, ~6x slower.)
    r"|,(?<=['\"],)(?:(?<=[Pp][Aa][Ss][Ss].,)|(?<=[Aa][Uu][Tt][Hh].,)|(?<=[Cc][Rr][Ee][Dd][Ss].,)"
    r"|(?<=[Tt][Ii][Aa][Ll].,)|(?<=[Tt][Ii][Aa][Ll][Ss].,))"
)
# Case-insensitive words are found with `str.find` on the lowered text, ~20x faster than `(?i)` in `re`.
_KEYWORDS = (
    "identified",
    "key",
    "token",
    "secret",
    "passw",
    "passphrase",
    "storepass",
    "keypass",
    "pwd",
    "bearer",
    "authoriz",
    "cookie",
    "contrase",
    "_pass",
    "auth",
    "sqlplus",
    "/p:",
    "net user",
    "vault login",
    # a vault's word for a secret value, and other languages' words for a password (a review, session 23)
    "securestring",
    "concealed",
    "kennwort",
    "senha",
    "wachtwoord",
    "haslo",
    "losenord",
    "salasana",
    "mot de passe",
    "pass:",
    "pass=",
    # a name judged as a key is, in a line of its own (`PGPASS\t...`, `| ROOT_PW | ... |`)
    "pgpass",
    "_pw",
    "stripe_sk",
    "credential",
    # a one-time code's or a PIN's key quoted in text (`{"otp": "..."}` in a message)
    'otp"',
    "otp'",
    'pin"',
    "pin'",
    '_code"',
    'cvv"',
    'cvc"',
    'card_number"',  # `{"card_number": "..."}`
    'cardnumber"',
    'credit_card"',
    'creditcard"',
)
_KEYWORDS_NOT_ASCII = ("пароль", "密码", "密碼", "パスワード", "비밀번호", "hasło", "lösenord", "contraseña")


# What Gson (Java's JSON, HTML-safe by default) escapes: `<`, `>`, `&`, `=`, `'`.
_ESCAPED_PUNCTUATION = re.compile(r"\\u00(3[cCeEdD]|2[67])")


def _is_candidate(text: str, lowered: str) -> bool:
    if _ANCHORS.search(text) is not None:
        return True
    # A plain loop: `any(generator)` costs more than the tests themselves on short strings.
    for word in _KEYWORDS:
        if word in lowered:
            return True
    if not lowered.isascii():
        for word in _KEYWORDS_NOT_ASCII:
            if word in lowered:
                return True
    return False


# --- honed's own rules -------------------------------------------------------------------------------

# An optional quote around a header or key name, escaped as JSON in JSON may be, to three levels
# (an SNS message in an SQS body, a QA pass, session 23).
_QUOTE_OPEN = r"\\{0,7}['\"]?"
_QUOTE = r"\\{0,7}['\"]"
_SEP = rf"{_QUOTE_OPEN}[ \t]*[:=][ \t]*{_QUOTE_OPEN}"


class _Rule:
    """One secret shape and its replacement.

    Without `anchors` the pattern must begin with a literal, which `re` finds fast. With `anchors`
    (lowercase words) it is tried only where one of them starts in the text, and matches from there:
    that is how the case-insensitive shapes stay cheap.
    """

    __slots__ = ("anchors", "pattern", "replace", "requires")

    def __init__(
        self,
        pattern: str,
        replace: str | Callable[[re.Match[str]], str],
        anchors: tuple[str, ...] = (),
        requires: str = "",
    ) -> None:
        self.pattern = re.compile(pattern)
        self.replace = replace
        self.anchors = anchors
        self.requires = requires  # a substring of every match: texts without it skip the rule

    def apply(self, text: str, lowered: str) -> str:
        if self.requires and self.requires not in text:
            return text
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


def _whole(kind: str, *, left_bounded: bool = False) -> Callable[[re.Match[str]], str]:
    """Replace the whole match; with `left_bounded`, only when it does not continue a longer word."""

    def replace(m: re.Match[str]) -> str:
        if left_bounded and _continues_word(m):
            return m.group(0)
        return _marker(kind)

    return replace


def _continues_word(m: re.Match[str]) -> bool:
    """Whether the match starts inside a word ("task-..." holds "sk-"). A `-` or `_` before it ends
    a word: `prod-sk-proj-...` and `AWS_KEY_AKIA...` were stored as written (a QA pass, session 28)."""
    start, text = m.start(), m.string
    if start == 0 or not text[start - 1].isalnum():
        return False
    # `q=my%20key%20sk-...`, `%22sk-ant-...`: an escaped space or quote ends the word before the key.
    return not (
        start >= 3
        and text[start - 3] == "%"
        and text[start - 2 : start].isalnum()
        and _is_hex(text[start - 2 : start])
    )


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


# A word of a table's header line naming a column for a secret (lowercase text).
_TABLE_WORD = re.compile(
    r"passw|pwd|secret|key|kennwort|contrase|senha|wachtwoord|has[lł]o|l[oö]senord|salasana|пароль|密码|パスワード|비밀번호"
)
# A table's column named for one of these holds secrets (not `token`, `auth`: a tokenizer's table,
# an API's docs, a review, session 23); a cell saying yes, no, none or required holds none.
_TABLE_KINDS = frozenset(("password", "private_key", "api_key", "aws_secret_key"))
_NOT_A_CELL_SECRET = frozenset(("required", "optional", "n/a", "-", "***", "hidden", "set", "unset"))
_MAX_TABLE_LINE = 4096


def _table_columns(text: str, lowered: str) -> str:
    """A table's cells under a column that names a secret (`| user | password |`, a CSV export's
    `name,password`: a SQL tool's result, a QA pass, session 23), each replaced; the table is read
    while its rows have the header's number of cells."""
    out: list[str] = []
    last = 0  # text[:last] is in `out`
    after = 0  # where the next header may start
    size = len(text)
    for m in _TABLE_WORD.finditer(lowered):
        if m.start() < after:
            continue
        start = text.rfind("\n", 0, m.start()) + 1
        end = text.find("\n", m.start())
        if end < 0:
            break  # the last line: no row under it
        after = end + 1
        header = text[start:end]
        sep = next((c for c in "|\t;," if c in header), None)
        if sep is None or len(header) > _MAX_TABLE_LINE:
            continue
        names = _cells(header, sep)
        if any(len(n.split()) > 3 for n in names):
            continue  # prose with commas or semicolons, not a table's header
        kinds = [secret_key_kind(n.strip(" '\"`*")) if len(n) <= _MAX_NAME else None for n in names]
        kinds = [k if k in _TABLE_KINDS else None for k in kinds]
        if not any(kinds):
            continue
        i = end + 1
        while i < size:
            j = text.find("\n", i)
            j = size if j < 0 else j
            row = text[i:j]
            if len(row) <= _MAX_TABLE_LINE and "-" in row and not row.strip(" \t|+:=-"):  # a rule, a border
                i = j + 1
                continue
            cells = _cells(row, sep) if len(row) <= _MAX_TABLE_LINE else []
            if len(cells) != len(names):
                break
            changed = False
            for k, kind in enumerate(kinds):
                value = cells[k].strip()
                if (
                    kind is not None
                    and _holds_secret(value, names[k].strip())
                    and value.lower() not in _VERDICTS
                    and value.lower() not in _NOT_A_CELL_SECRET
                    and not value.startswith("[REDACTED:")
                ):
                    cells[k] = cells[k].replace(value, _marker(kind), 1)
                    changed = True
            if changed:
                out.append(text[last:i])
                out.append(_joined(row, sep, cells))
                last = j
            i = j + 1
        after = i
    if not out:
        return text
    out.append(text[last:])
    return "".join(out)


# A line that names its value (an environment's dump, a settings table, a CSV or a tab-separated
# export: `DB_PASSWORD\tV`, `| ROOT_PW | V |`, `STRIPE_SK,V`, `export PGPASS=V`): the name is
# judged as a dict key is (`secret_key_kind`), the value is the next cell, one word. `=` and `:`
# count only after a name in capitals, as environments write them (`password = input()` is code,
# and the assignment rules read it). A QA pass, session 25: a markdown table, a tab or a comma
# after any of 72 common names, and `PGPASS=`, `CREDENTIALS=`, `ROOT_PW=` kept every value.
_NAMED_LINE = re.compile(
    r"(?m)^[ \t]*+(?:\|[ \t]*+)?(?:[-*][ \t]++|export[ \t]++|declare[ \t]++-x[ \t]++|set[ \t]++|\$env:)?"
    r"(['\"`]?)([A-Za-z_/][\w./-]{1,127})\1"
    r"(?:[ ]*+(\t|\|)[ \t]*+|(,)|[ \t]*+([=:])[ \t]*+)"
    r"(?:\\?['\"])?([^\s'\"|,`]{4,512})(?:\\?['\"])?(?=[ \t]*(?:[|,;\t\r]|$))"
)
# What a settings table's value column holds when it holds no secret.
_NOT_A_VALUE = frozenset(
    (
        "string", "str", "int", "integer", "bool", "boolean", "text", "varchar", "number", "secret",
        "securestring", "password", "masked", "none", "null", "undefined", "empty", "redacted",
        "string?", "required", "optional", "default", "value", "changeme", "example", "xxxx",
    )
)  # fmt: skip
_LOOSE_KINDS = frozenset(("token", "authorization", "cookie", "bearer"))


def _named_lines(text: str) -> str:
    if len(text) > _MAX_JSON_TEXT:
        return text
    return _NAMED_LINE.sub(_named_line, text)


def _named_line(m: re.Match[str]) -> str:
    name, value = m.group(2), m.group(6)
    assigned = m.group(5) is not None
    env_name = name.isupper() or (name[:1].isupper() and "_" in name and name.upper() == name)
    if assigned and not env_name:
        return m.group(0)  # `password = input()`, `token: the next word`: the assignment rules' to read
    kind = secret_key_kind(name.rsplit("/", 1)[-1].rsplit(".", 1)[-1])
    if kind is None and env_name and name.endswith("_KEY") and _random_shaped(value):
        kind = "api_key"  # `DEPLOY_KEY`, `ENC_KEY`: an environment's key of a generated shape
    if kind is None or value.startswith("[REDACTED:") or value.lower() in _NOT_A_VALUE:
        return m.group(0)
    lowered = value.lower()
    if lowered in _VERDICTS or lowered in _NOT_A_CELL_SECRET or not _holds_secret(value, name):
        return m.group(0)
    if _is_reference(value) or _PLACEHOLDER.fullmatch(value) or set(value) <= set("*x.X•"):
        return m.group(0)  # `$DB_PASSWORD`, `<your key>`, `********`
    if _NOT_A_CREDENTIAL.fullmatch(value) or _CODE.fullmatch(value) or _CODE_CUT.match(value):
        return m.group(0)  # a path, a URL (its password has a rule), a variable's name, a date, code
    if (not env_name or kind in _LOOSE_KINDS) and kind != "password" and not _credential_shaped(value):
        return m.group(0)  # `| token | id |` (a tokenizer's table), `auth,basic`: words, not keys
    return _splice(m, 6, _marker(kind))


# `--db-pass=V`, `--signing-key V` on a command line (a process list, a CI log): a flag named as a
# secret's key is, judged as one (a QA pass, session 25: 39 of 72 names kept their value).
def _named_flag(m: re.Match[str]) -> str:
    flag, value = m.group(1), m.group(3)
    kind = secret_key_kind(flag)
    if kind is None and flag.endswith("-key") and _random_shaped(value):
        kind = "api_key"  # `--deploy-key`, `--enc-key`: a key of a generated shape
    if kind is None or _is_reference(value) or value.lower() in _VERDICTS or value.startswith("[REDACTED:"):
        return m.group(0)
    if _NOT_A_CREDENTIAL.fullmatch(value) or _PLACEHOLDER.fullmatch(value):
        return m.group(0)  # `--ssh-key ~/.ssh/id`, `--api-key <KEY>`
    if (kind != "password" or m.group(2) is None) and not _credential_shaped(value):
        return m.group(0)  # `--session-key name`, `--pass 3`: not a credential's shape
    return _splice(m, 3, _marker(kind))


def _cells(line: str, sep: str) -> list[str]:
    """A table line's cells; a quoted CSV line's, unquoted, by the `csv` module."""
    if '"' not in line or sep in "|":
        return line.split(sep)
    try:
        return next(csv.reader([line], delimiter=sep))
    except (csv.Error, StopIteration):
        return []


def _joined(row: str, sep: str, cells: list[str]) -> str:
    """The row with its changed cells: split back as it was, or, quoted, each old value replaced."""
    if '"' not in row or sep in "|":
        return sep.join(cells)
    out = io.StringIO()
    quoting = csv.QUOTE_ALL if row.lstrip().startswith('"') else csv.QUOTE_MINIMAL
    csv.writer(out, delimiter=sep, quoting=quoting, lineterminator="").writerow(cells)
    return out.getvalue()


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
    start = m.start()
    if start and m.string[start - 1] in "-_" and not m.group(1) and "-" in key[3:]:
        return key  # "my-sk-learn-models-2024-v3": a hyphenated name (a plain key has no `-` after sk-)
    # Plain "sk-" needs a digit or the OpenAI tag: "sk-learn-and-other-long-hyphenated-words" is prose.
    if m.group(1) or "T3BlbkFJ" in key or any(c.isdigit() for c in key):
        return _marker("openai_key")
    return key


def _jwt(m: re.Match[str]) -> str:
    """A dotted run of token characters with every JWT in it replaced; the text before `eyJ` stays."""
    run = m.group(0)
    if "eyJ" not in run:
        return run
    segments = run.split(".")
    out: list[str] = []
    k = 0
    while k < len(segments):
        segment = segments[k]
        at = segment.find("eyJ")
        if at >= 0 and len(segment) - at >= 11 and k + 1 < len(segments) and len(segments[k + 1]) >= 8:
            out.append(segment[:at] + _marker("jwt"))
            k += 3  # header, payload and signature (when there is one)
        else:
            out.append(segment)
            k += 1
    return ".".join(out)


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
    # "Bearer" as a header writes it takes a long token of letters too; "the bearer of bad news" stays.
    long_enough = 20 if m.string[m.start()] == "b" else 16
    if len(token) >= 8 and (len(token) >= long_enough or any(c.isdigit() for c in token)):
        return _splice(m, 1, _marker("bearer"))
    return m.group(0)


def _matched_group(kind: str) -> Callable[[re.Match[str]], str]:
    """Replace the group the match took (of a pattern whose alternatives each capture one)."""

    def replace(m: re.Match[str]) -> str:
        return _splice(m, m.lastindex or 0, _marker(kind))

    return replace


def _xml_element(m: re.Match[str]) -> str:
    name, value = m.group(1), m.group(2)
    kind = secret_key_kind(name.rpartition(":")[2])
    return _splice(m, 2, _marker(kind)) if kind is not None and _holds_secret(value, name) else m.group(0)


def _yaml_named_value(m: re.Match[str]) -> str:
    name, value = m.group(2), m.group(4)
    kind = secret_key_kind(name)
    return _splice(m, 4, _marker(kind)) if kind is not None and _holds_secret(value, name) else m.group(0)


def _named_value(m: re.Match[str]) -> str:
    """`'name': 'DB_PASSWORD', 'value': '...'` or `['X-Api-Key', '...']` as text: the value goes when
    the name names a secret (`secret_key_kind`, the rule for dict keys)."""
    name, value = m.group(1), m.group(2)
    kind = secret_key_kind(name)
    return _splice(m, 2, _marker(kind)) if kind is not None and _holds_secret(value, name) else m.group(0)


# URL users that are tokens: the scheme is http(s) or git, and the user is long and mixes letters
# and digits ("ghp..." and other vendor tokens are redacted earlier, by their own rules).
_TOKEN_SCHEMES = ("http", "https", "git")


def _url_token(m: re.Match[str]) -> str:
    user = m.group(1)
    scheme = m.string[max(0, m.start() - 10) : m.start()].lower()
    if not scheme.endswith(_TOKEN_SCHEMES) or "." in user:
        return m.group(0)  # ssh://git@host, https://first.last@host
    if len(user) >= 32 or (any(c.isdigit() for c in user) and any(c.isalpha() for c in user)):
        return _splice(m, 1, _marker("token"))
    return m.group(0)  # https://bob@bitbucket.org


def _is_reference(value: str) -> bool:
    """A shell variable or an option, not a password: `$PASS`, `${PASS}`, `$(cat f)`, `--user`."""
    return value.startswith(("$", "-")) or value == ""


def _user_password(m: re.Match[str]) -> str:
    user, password = m.group(1), m.group(2)
    if _is_reference(password) or user.startswith("$") or (user.isdigit() and password.isdigit()):
        return m.group(0)  # `docker run -u 1000:1000`, `-u "$(id -u):$(id -g)"`
    return _splice(m, 2, _marker("password"))


def _password_flag(m: re.Match[str]) -> str:
    group = 2 if m.group(2) is not None else 3
    if _is_reference(m.group(group)):
        return m.group(0)  # `mysql --password --user bob` prompts
    return _splice(m, group, _marker("password"))


def _key_flag(m: re.Match[str]) -> str:
    """`--api-key KEY`, `--token TOKEN`, `--secret S` on a command line (`--token=T` is an assignment)."""
    group = 3 if m.group(3) is not None else 4
    if _is_reference(m.group(group)) or len(m.group(group)) < 8:
        return m.group(0)  # `--token $TOKEN`, `--api-key --help`, `--secret name`
    flag = m.group(1).lower()
    kind = "api_key" if "key" in flag else "token" if "token" in flag else "secret"
    return _splice(m, group, _marker(kind))


# Commands whose `-p` is a password: attached only (`mysql -pPASS`; `mysql -p db` prompts), either way,
# or after `login` with a space.
_ATTACHED_P = ("mysql", "mariadb", "7z")
_ANY_P = ("sshpass", "mongo")  # `mongo`, `mongosh`, `mongodump`, ... take `-p PASSWORD`
# Other commands' flags whose value is a password (a QA pass, session 19: each reached the store).
_STORE_PASS = ("-storepass", "-keypass", "-srcstorepass", "-deststorepass", "-srckeypass", "-destkeypass")
_HTTPIE = ("http", "https", "xh", "xhs")
_PASSWORD_FLAGS = {
    "redis-cli": ("-a",),
    **{name: ("-a", "--auth") for name in _HTTPIE},  # httpie: `-a user:PW`
    "openssl": ("-k",),  # `openssl enc -k PW`
    "sqlcmd": ("-P",),
    "bcp": ("-P",),
    "zip": ("-P",),
    "unzip": ("-P",),
    "mosquitto_pub": ("-P",),
    "mosquitto_sub": ("-P",),
    "plink": ("-pw",),
    "pscp": ("-pw",),
    "psftp": ("-pw",),
    "keytool": _STORE_PASS,
    "jarsigner": _STORE_PASS,
    **{
        name: ("-w",)
        for name in ("ldapsearch", "ldapadd", "ldapmodify", "ldapdelete", "ldapwhoami", "ldappasswd")
    },
}


def _command_password_flag(m: re.Match[str]) -> str:
    """`redis-cli -a PW`, `sqlcmd -P PW`, `ldapsearch -w PW`, `keytool -storepass PW`: the flag is a
    password's only for the commands that say so (`ls -a`, `mysql -P 3306`, `grep -w` are not)."""
    group = 3 if m.group(3) is not None else 4
    if _is_reference(m.group(group)):
        return m.group(0)
    flag = m.group(1)
    for word in _command_before(m).split():
        command = word.rpartition("/")[2]
        if flag in _PASSWORD_FLAGS.get(command, ()):
            if command in _HTTPIE:  # `-a user:PW`; `-a user` prompts for it
                user, colon, password = m.group(group).partition(":")
                return (
                    _splice(m, group, f"{user}:{_marker('password')}") if colon and password else m.group(0)
                )
            return _splice(m, group, _marker("password"))
    return m.group(0)


def _echoed_to_sudo(m: re.Match[str]) -> str:
    """`echo PW | sudo -S ...`: sudo reads the password from its input."""
    group = 2 if m.group(2) is not None else 3
    return m.group(0) if _is_reference(m.group(group)) else _splice(m, group, _marker("password"))


_LOGIN_P = ("docker", "podman", "nerdctl", "helm", "buildah", "skopeo")


def _short_password_flag(m: re.Match[str]) -> str:
    group = 3 if m.group(3) is not None else 4
    if _is_reference(m.group(group)):
        return m.group(0)
    command = _command_before(m)
    if any(name in command for name in _ANY_P) or (
        any(name in command for name in _ATTACHED_P)
        if m.group(1) is None
        else " login " in command and any(name in command for name in _LOGIN_P)
    ):
        return _splice(m, group, _marker("password"))
    return m.group(0)  # `docker run -p 8080:80`, `ssh -p 2222`, `mkdir -p`


def _command_before(m: re.Match[str]) -> str:
    """The lowered command that `m` is an argument of: its line up to `m`, back to `;`, `|` or `&`."""
    head = m.string[max(0, m.start() - 256) : m.start()]
    start = max(head.rfind("\n"), head.rfind(";"), head.rfind("|"), head.rfind("&"))
    return head[start + 1 :].lower()


# `password X` is a netrc's only after its `machine`, `login` or `account` token (`login bob password X`,
# on one line or several); "password reset instructions" stays.
_NETRC_BEFORE = re.compile(r"(?<!\S)(?:machine|login|account)\s+\S+\s+\Z")


# Not a credential: a variable (`$KEY`, `${KEY}`, `$(cat f)`), a template (`{uid}`), a tokenizer's
# special token (`<|endoftext|>`); in code, also a call whose arguments are names (`model(x`,
# `getpass.getpass(`) or an attribute (`settings.JWT_SIGNING_KEY`). A review (session 21) found
# Django keys and passwords with a `(` among other symbols leaking by a looser rule.
_PLACEHOLDER = re.compile(r"\$(?:[A-Za-z_]\w*|\{.*|\(.*)|<[^<>]*>|\{\w*\}?")
_CODE = re.compile(r"[A-Za-z_][\w.]*\([\w.,\[\] '\"]*\)?|[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")


def _random_shaped(value: str) -> bool:
    """A generated key's shape: 16+ characters mixing three of lower case, upper case and digits,
    or 32+ hex digits (`homepage_banner_2024` is not one)."""
    if len(value) < 16:
        return False
    classes = (
        any(c.islower() for c in value) + any(c.isupper() for c in value) + any(c.isdigit() for c in value)
    )
    return classes >= 3 or (len(value) >= 32 and _is_hex(value))


# What a value is when it is not a credential: a URL, a file path, an environment variable's name,
# a date or a time (a review, session 22: "Get your API key: https://...", "SSH_KEY=~/.ssh/id_ed25519",
# "Set your API key: OPENAI_API_KEY", "the secret is 2024-12-31T00:00:00Z" were redacted).
# A path has two parts at least, of a path's characters (a base64 key starting with `/` is no
# path, nor `/9j4KqzT8vW2nR5sY7uB`); a name is words (`K9D2_PQ7Z_X4M1_R8VW` is no name): a
# second review, session 22, found those spared.
_NOT_A_CREDENTIAL = re.compile(
    r"[A-Za-z][\w+.-]*://\S*"
    r"|(?:~|\.{1,2})/[\w.@-]+(?:/[\w.@-]+)*"
    r"|(?:/[\w.@-]+){2,}/?"
    r"|[\w.-]+(?:/[\w.-]+)+\.[A-Za-z]{1,5}"
    r"|[A-Z]{2,}[0-9]?(?:_[A-Z]{2,}[0-9]?)+"
    r"|\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?"
)


def _free_key(out: dict[Any, Any], key: Any) -> str:
    """`key#2`, `key#3` ...: the first not in `out`. The hook runs on keys, and a dict keyed by
    e-mail addresses, each masked alike, kept one entry of three (a review, session 22)."""
    n = 2
    while f"{key}#{n}" in out:
        n += 1
    return f"{key}#{n}"


def _credential_shaped(value: str, *, in_code: bool = False) -> bool:
    """Long, and letters mixed with digits or symbols: a credential's shape, not a word (nor, in
    code, a call or an attribute; nor a URL, a path, a variable's name or a date)."""
    if len(value) < 8 or _NOT_A_CREDENTIAL.fullmatch(value):
        return False
    if _random_shaped(value):
        return True
    if _PLACEHOLDER.fullmatch(value) or (in_code and _CODE.fullmatch(value)):
        return False
    digits = any(c.isdigit() for c in value)
    if value.isalpha() and len(value) >= 12 and not (value.islower() or value.isupper()):
        return not _cased_words(value)  # `SmxFdzzkEuKCtomY`, not `MySQLDatabase`
    return (digits and any(c.isalpha() for c in value)) or (not value.isalnum() and len(value) >= 12)


# An unquoted value cut at a quote, in code: `os.environ[`, `config[`, `cfg.openai[0`, `load(`.
_CODE_CUT = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*[\[(]\w*")
_CASED_PART = re.compile(r"[A-Z]{2,4}(?=[A-Z][a-z]|$)|[A-Z]?[a-z]{2,}|[A-Z][a-z]")


def _cased_words(value: str) -> bool:
    """Whether mixed-case letters read as an identifier's words (`OpenAIEmbeddings`,
    `MTLRenderPassDescriptor`): words of a capital and two lower-case letters or more, each with
    a lower-case vowel, and acronyms of two to four capitals, no more acronyms than words.
    Random letters break into parts that are neither (`Smx`, `Fdzzk`, a lone capital): about 1%
    of 16 random letters pass (`_cased_words` against random strings, a review, session 22)."""
    parts = _CASED_PART.findall(value)
    if sum(map(len, parts)) != len(value):
        return False
    words = [p for p in parts if not p.isupper()]
    return len(words) * 2 >= len(parts) and all(any(c in "aeiouy" for c in p) for p in words)


def _random_group(group: int, kind: str) -> Callable[[re.Match[str]], str]:
    def replace(m: re.Match[str]) -> str:
        return _splice(m, group, _marker(kind)) if _random_shaped(m.group(group)) else m.group(0)

    return replace


def _pgpass_line(m: re.Match[str]) -> str:
    """`host:port:database:user:PASSWORD`, a whole line of a `.pgpass` file: its host, database
    and user are names (a letter in each, or `*`), so times and addresses stay."""
    line_start = m.string.rfind("\n", 0, m.start()) + 1
    host = m.string[line_start : m.start()].strip()
    named = all(f == "*" or any(c.isalpha() for c in f) for f in (host, m.group(1), m.group(2)))
    if not named or not re.fullmatch(r"[\w.*\[\]-]+", host):
        return m.group(0)
    return _splice(m, 3, _marker("password"))


# Words that say what a password is like, not what it is: "the password is: not set", "... is: too short".
_NOT_A_PASSPHRASE = frozenset(
    (
        "not", "no", "required", "incorrect", "invalid", "wrong", "missing", "empty", "hidden", "unset", "set",
        "too", "the", "a", "an", "your", "my", "at", "in", "on", "stored", "sent", "reset", "changed", "expired",
        "case", "between", "must", "should", "will", "can", "cannot", "needed", "optional", "same", "different",
        "weak", "strong", "valid", "saved", "encrypted", "hashed", "unknown", "shown", "below", "above",
    )
)  # fmt: skip


def _passphrase_after_colon(m: re.Match[str]) -> str:
    """ "The password is: purple monkey dishwasher 42": words after a colon are the password
    (a QA pass, session 24: only one word shaped as a credential was looked for); "is: not set",
    "is: too short" say something of it and stay."""
    words = m.group(2).split()
    if not 2 <= len(words) <= 8 or words[0].lower().strip(".,!") in _NOT_A_PASSPHRASE:
        return m.group(0)
    if any(len(w) > 32 for w in words):
        return m.group(0)
    return _splice(m, 2, _marker("password"))


_QUOTED_NAME = re.compile(r"[\"']([A-Za-z][\w-]{0,63})\Z")


def _quoted_named_value(m: re.Match[str]) -> str:
    quoted = _QUOTED_NAME.search(m.string, max(0, m.start() - 65), m.start())
    kind = secret_key_kind(quoted.group(1)) if quoted is not None else None
    value = m.group(2)
    if kind is None or not _holds_secret(value, quoted.group(1)) or value.lower() in _VERDICTS:
        return m.group(0)
    return _splice(m, 2, _marker(kind))


def _telegram_token(m: re.Match[str]) -> str:
    before = m.string[max(0, m.start() - 12) : m.start()]
    digits = len(before) - len(before.rstrip("0123456789"))
    return ":" + _marker("telegram_bot_token") if 6 <= digits <= 12 else m.group(0)


def _unquoted_pass(m: re.Match[str]) -> str:
    value = m.group(2)
    return _splice(m, 2, _marker("password")) if _credential_shaped(value) else m.group(0)


def _aws_secret_in_prose(m: re.Match[str]) -> str:
    value = m.group(1)
    return (
        _splice(m, 1, _marker("aws_secret_key"))
        if _random_shaped(value) or _credential_shaped(value)
        else m.group(0)
    )


def _sentence_secret(m: re.Match[str]) -> str:
    """ "the password is hunter2x" goes; "the password is incorrect" stays."""
    value = m.group(2)
    core = value.rstrip(".")
    if not _credential_shaped(core):
        return m.group(0)
    name = m.group(1).lower()
    before = m.string[max(0, m.start() - 16) : m.start()].lower().split()
    if name == "token" and before and before[-1].strip("_-") in _PUBLIC_TOKENS:
        return m.group(0)  # "the eos token is ...": a tokenizer's special token
    kind = (
        "password"
        if name.startswith(("pass", "kennwort", "mot de passe"))
        else "secret"
        if name == "secret"
        else "token"
        if "token" in name
        else "api_key"
    )
    return _splice(m, 2, _marker(kind) + value[len(core) :])


def _config_setting(m: re.Match[str]) -> str:
    name = m.group(1)
    kind = secret_key_kind(name.rpartition(":")[2].rpartition(".")[2]) or secret_key_kind(name)
    value = m.group(3) if m.group(3) is not None else m.group(4)
    if kind is None or not _credential_shaped(value) or _is_reference(value):
        return m.group(0)  # `npm config set always-auth true`, "config token limit"
    return _splice(m, 3 if m.group(3) is not None else 4, _marker(kind))


def _terraform_default(m: re.Match[str]) -> str:
    kind = secret_key_kind(m.group(1))
    if kind is None or m.group(2).lower() in ("true", "false", "null"):
        return m.group(0)  # `variable "enable_auth" { default = "true" }`: a switch (a review, session 22)
    return _splice(m, 2, _marker(kind))


# Prose around a command's name ("use htpasswd -b to set the password", "openssl passwd to create a
# hash") put a word where the command takes its password (a review, session 22).
_PROSE_WORDS = frozenset(
    ("to", "the", "a", "an", "and", "or", "it", "is", "with", "for", "of", "in", "on", "that", "this",
     "your", "you", "then", "from", "as", "by", "at", "be", "can", "will", "which", "when", "if")
)  # fmt: skip


def _command_password(m: re.Match[str]) -> str:
    value = m.group(m.lastindex or 0)
    return m.group(0) if value.lower() in _PROSE_WORDS else _matched_group("password")(m)


_SQL_ITEM = re.compile(r"""\s*('(?:[^']|'')*'|"[^"]*"|[^,]*?)\s*(?:,|$)""")


def _sql_insert(m: re.Match[str]) -> str:
    """A value goes where its column names a secret: positions matched, quotes kept."""
    columns = [c.strip().strip('"`[]') for c in m.group(1).split(",")]
    kinds = [secret_key_kind(c) for c in columns]
    if not any(kinds):
        return m.group(0)
    values = [v for v in _SQL_ITEM.findall(m.group(2))]
    if values and values[-1] == "":
        values.pop()
    if len(values) != len(columns):
        return m.group(0)
    out = []
    for value, kind in zip(values, kinds, strict=True):
        if kind is not None and value[:1] in ("'", '"') and len(value) > 2:
            value = value[0] + _marker(kind) + value[0]
        out.append(value)
    return _splice(m, 2, ", ".join(out))


def _netrc_password(m: re.Match[str]) -> str:
    if _NETRC_BEFORE.search(m.string, max(0, m.start() - 256), m.start()) is None:
        return m.group(0)
    return _splice(m, 1, _marker("password"))


def _flag_or_tally(value: str) -> bool:
    return value.isdigit() or value.lower() in _VERDICTS


# `<NAME>_KEY` names a secret in an environment, but not these.
_NOT_SECRET_KEYS = tuple(
    f"{w}_"
    for w in (
        "public", "primary", "sort", "partition", "cache", "hash", "range", "foreign", "idempotency",
        "routing", "object", "s3", "lookup", "group", "dedup", "unique", "map", "hot", "shortcut", "pub",
        "index", "row", "column", "join", "shard", "message", "item", "record", "entity", "resource",
    )
)  # fmt: skip


_KEY_WORD_BEFORE = re.compile(r"([A-Za-z0-9]+)[_-]?\Z")


def _named_key(before: str) -> bool:
    """Whether the word before `_KEY` names a secret key (`SECRET_`, `STRIPE_`, `SIGNING_`)."""
    word = _KEY_WORD_BEFORE.search(before)
    return word is not None and (
        word.group(1).lower() in _STRONG_KEY_WORDS or word.group(1).lower() in _KEY_VENDORS
    )


_STRONG_KEY_WORDS = frozenset(
    ("api", "access", "private", "auth", "secret", "client", "label", "deploy", "ssh", "gpg", "pgp", "admin")
)


def _assignment(m: re.Match[str]) -> str:
    word = m.group(1).lower()
    if word.startswith(("pass", "pwd", "contrase")):
        kind = "password"  # `password`, and `DB_PASS` / `smtp_pass` (only after an underscore)
    elif word in ("token", "secret"):
        kind = word
    elif word == "auth":  # `"auth": "dXNlcjpwYXNz"` (a Docker config), `?auth=...`
        kind = "secret"
    else:  # "...key": say which key when the name tells
        name = m.string[max(0, m.start() - 12) : m.start()].lower()
        if word == "key" and name.endswith(_NOT_SECRET_KEYS):
            return m.group(0)  # `PRIMARY_KEY=id`, `PUBLIC_KEY=...`, `CACHE_KEY=...`
        kind = "private_key" if "priv" in name else "secret" if "secret" in name + word else "api_key"
    given = m.group(5) if m.group(5) is not None else m.group(6)
    if word == "pass" and _flag_or_tally(given.rstrip(":.")):
        return m.group(0)  # `first_pass = True`, `n_pass: 3`: a flag or a tally, not a password
    if (
        (m.group(1) == "pass" and not _credential_shaped(given, in_code=True))
        or (
            m.group(1) == "KEY"
            and (
                _PLACEHOLDER.fullmatch(given) is not None  # `STRIPE_KEY=${STRIPE_KEY}`
                or len(given) < 6  # `APP_KEY='main'`; `SSH_KEY=~/.ssh/id`, `X_KEY = settings.X_KEY`:
                or _NOT_A_CREDENTIAL.fullmatch(given) is not None  # a path, a name, code
                or _CODE.fullmatch(given) is not None
                or (m.group(5) is None and _CODE_CUT.fullmatch(given) is not None)  # `os.environ["X"]`
                or not (_named_key(m.string[max(0, m.start() - 24) : m.start()]) or _random_shaped(given))
            )
        )
    ):
        # `forward_pass = model(x)`, `STORAGE_KEY = 'todos-vuejs'`: code, not secrets; a lowercase
        # `*_pass` or an upper-case `*_KEY` names one only with a credential's shape
        return m.group(0)
    if m.group(5) is not None:
        return _splice(m, 5, _marker(kind))
    # Unquoted after a colon: "password: hunter2" is a secret, but "token: the next word" and
    # "secret: always test" are prose, so other kinds need a credential's shape (a digit, or length).
    value = m.group(6)
    if (
        kind != "password"
        and "=" not in m.group(2)
        and "%3" not in m.group(2)
        and len(value) < 16
        and not any(c.isdigit() for c in value)
    ):
        return m.group(0)
    return _splice(m, 6, _marker(kind))


# A Kubernetes Secret: every value under its `data` / `stringData` is a secret (base64 or not), as
# `kubectl get secret -o json|yaml` prints it (a QA pass, session 19: an `.env` holding an OpenAI
# key and a `.dockerconfigjson` holding `user:pass` reached the store still base64-encoded).
_K8S_SECRET = re.compile(
    r"(?m)(?:\"kind\"[ \t]*:[ \t]*\"Secret\"|^[ \t]*kind:[ \t]*['\"]?Secret['\"]?[ \t]*$)"
)
_JSON_ENTRY = re.compile(r'("(?:[^"\\\n]|\\.){1,256}"[ \t]*:[ \t]*)"(?:[^"\\\n]|\\.)*"')
_YAML_ENTRY = re.compile(r"(?m)^([ \t]+[^:\n]{1,256}:[ \t]*)(?!\[REDACTED:)(\S[^\n]*)$")


_SECRET_DATA_KEYS = frozenset(("data", "stringData"))


def _is_secret_object(value: dict[Any, Any]) -> bool:
    """Whether `value` is a Kubernetes Secret as an object (the client's `to_dict()`, a parsed
    manifest): every value of its `data` / `stringData` is a secret, whatever its key's name."""
    return value.get("kind") == "Secret" and any(type(value.get(k)) is dict for k in _SECRET_DATA_KEYS)


_secret_seen: tuple[str | None, bool] = (None, False)


def _is_secret_manifest(text: str) -> bool:
    """Whether `text` prints a Kubernetes Secret: searched once per text, not once per `data` key
    (a large API response holds hundreds)."""
    global _secret_seen
    seen = _secret_seen
    if seen[0] is not text:
        seen = _secret_seen = (text, _K8S_SECRET.search(text) is not None)
    return seen[1]


def _secret_data_json(m: re.Match[str]) -> str:
    if not _is_secret_manifest(m.string):
        return m.group(0)
    return m.group(1) + _JSON_ENTRY.sub(lambda e: e.group(1) + '"' + _marker("secret") + '"', m.group(2))


def _secret_data_yaml(m: re.Match[str]) -> str:
    if not _is_secret_manifest(m.string):
        return m.group(0)
    return m.group(1) + _YAML_ENTRY.sub(lambda e: e.group(1) + _marker("secret"), m.group(3))


_RULES = (
    _Rule(
        r'("(?:data|stringData)"[ \t]*:[ \t]*\{)([^{}]*)',
        _secret_data_json,
        anchors=('"data"', '"stringdata"'),
    ),
    _Rule(
        r"(?m)^(([ \t]*)(?:data|stringData):[ \t]*\n)((?:\2[ \t]+[^\n]*(?:\n|$))+)",
        _secret_data_yaml,
        anchors=("data:", "stringdata:"),
    ),
    # PEM private keys, header to footer across lines; an unterminated block is redacted to the end.
    _Rule(
        r"(?s)-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*?"
        r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)",
        _marker("private_key"),
    ),
    _Rule(r"sk-ant-[A-Za-z0-9_-]{16,}", _whole("anthropic_key", left_bounded=True)),
    _Rule(r"sk-(proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}", _openai),
    _Rule(r"(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})", _whole("github_token")),
    # Slack bot/user/app/config/refresh tokens (xoxb-, xoxp-, xapp-, xoxe.xoxp-, xoxe-).
    _Rule(r"(?:xox[abposre]|xoxe\.xox[bp]|xapp)-[A-Za-z0-9-]{10,}", _whole("slack_token")),
    _Rule(r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]+", _marker("slack_webhook")),
    _Rule(r"AIza[0-9A-Za-z_-]{35}", _whole("google_api_key")),
    _Rule(
        r"(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}(?![A-Z0-9])",
        _whole("aws_access_key", left_bounded=True),
    ),
    # ... and the 40-character secret key written right after one (`AKIA... / wJalr...`, a credentials
    # CSV's `AKIA...,wJalr...`); alone, such a key is any 40 characters of base64, and stays.
    _Rule(
        r"\[REDACTED:aws_access_key\](?:[ \t]*[,;:|/][ \t]*|[ \t\r\n]{1,8})([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])",
        _group(1, "aws_secret_key"),
    ),
    # JWTs (header.payload[.signature], the header starting `eyJ`), found as whole dotted runs of token
    # characters: a pattern starting at each `eyJ` would scan to the end of the run from every one of
    # them, quadratic in `eyJeyJeyJ...`.
    _Rule(r"(?<![A-Za-z0-9_.-])[A-Za-z0-9_-]*+(?:\.[A-Za-z0-9_-]*+)++", _jwt, requires="eyJ"),
    _Rule(r"hf_[A-Za-z0-9]{30,}", _whole("huggingface_token")),
    # The keys a LangChain agent's process holds besides its model's: LangSmith, Tavily, and the
    # OpenAI-compatible providers (Groq, xAI, Perplexity, NVIDIA).
    _Rule(r"lsv2_(?:pt|sk)_[A-Za-z0-9_]{20,}", _whole("langsmith_key", left_bounded=True)),
    _Rule(r"tvly-(?:dev-|prod-)?[A-Za-z0-9]{20,}", _whole("tavily_key", left_bounded=True)),
    _Rule(r"gsk_[A-Za-z0-9]{40,}", _whole("groq_key", left_bounded=True)),
    _Rule(r"xai-[A-Za-z0-9]{40,}", _whole("xai_key", left_bounded=True)),
    _Rule(r"pplx-[A-Za-z0-9]{40,}", _whole("perplexity_key", left_bounded=True)),
    _Rule(r"nvapi-[A-Za-z0-9_-]{40,}", _whole("nvidia_key", left_bounded=True)),
    # HashiCorp Vault service, batch and recovery tokens; DigitalOcean personal, OAuth and refresh
    # tokens; Shopify access tokens; Google OAuth access and refresh tokens; Discord webhooks.
    _Rule(r"hv[sbr]\.[A-Za-z0-9_-]{24,}", _whole("vault_token", left_bounded=True)),
    _Rule(r"do[por]_v1_[a-f0-9]{64}", _whole("digitalocean_token", left_bounded=True)),
    _Rule(r"shp(?:at|ca|pa|ss)_[a-fA-F0-9]{32}", _whole("shopify_token", left_bounded=True)),
    _Rule(r"ya29\.[0-9A-Za-z_-]{20,}", _whole("google_oauth_token", left_bounded=True)),
    _Rule(r"1//0[0-9A-Za-z_-]{30,}", _whole("google_refresh_token", left_bounded=True)),
    _Rule(
        r"https://(?:canary\.|ptb\.)?discord(?:app)?\.com/api/webhooks/[0-9]+/[A-Za-z0-9_-]+",
        _marker("discord_webhook"),
    ),
    # Keys in connection strings and signed URLs: Azure's `AccountKey=` and `SharedAccessKey=`, a
    # SAS URL's `sig=`, S3's `X-Amz-Signature=` and GCS's `X-Goog-Signature=` (each grants access
    # on its own until it expires).
    _Rule(
        rf"(?i)(?<![A-Za-z0-9_-])(?:accountkey|sharedaccesskey|sig|x-amz-signature|x-goog-signature)="
        rf"{_NOT_REDACTED}([^\s&;'\"<>]{{16,}})",
        _group(1, "secret"),
        anchors=("accountkey=", "sharedaccesskey=", "sig=", "x-amz-signature=", "x-goog-signature="),
    ),
    _Rule(r"npm_[A-Za-z0-9]{36}", _whole("npm_token")),
    # Stripe secret and restricted keys (test and live), and webhook signing secrets.
    _Rule(
        r"(?:[sr]k_(?:live|test)|whsec)_[A-Za-z0-9]{16,}",
        _whole("stripe_access_key"),
        anchors=("sk_live_", "sk_test_", "rk_live_", "rk_test_", "whsec_"),
    ),
    # scheme%3A%2F%2Fuser%3APASSWORD%40host: the same URL percent-encoded, as a query string carries it.
    # An encoded `/` (`%2F`) ends the userinfo (in it, a `/` would be `%252F`): without that stop,
    # the password's scan ran from every `%3a%2f%2f` to the end of the text (60 KB: 6 s).
    _Rule(
        r"%3[Aa]%2[Ff]%2[Ff](?:[^\s%/?#@&'\"<>]|%(?!3[Aa]|40|2[Ff])[0-9A-Fa-f]{2})*+%3[Aa]"
        rf"{_NOT_REDACTED}((?:[^\s%/?#@&'\"<>]|%(?!40|2[Ff])[0-9A-Fa-f]{{2}})++)%40",
        _group(1, "password"),
        anchors=("%3a%2f%2f",),
    ),
    # <password>...</password>, <apiKey>...</apiKey> (Maven's settings.xml, app configs): an element
    # whose name names a secret (`secret_key_kind`, the rule for dict keys) loses its text.
    _Rule(
        rf"<([A-Za-z_][\w.:-]{{0,63}}+)(?:[ \t][^<>]{{0,256}}+)?>{_NOT_REDACTED}([^<]{{1,4096}}+)</\1[ \t]*>",
        _xml_element,
        requires="</",
    ),
    # A YAML name/value entry (a Kubernetes `env:` list): `- name: DB_PASSWORD` then `value: ...`.
    _Rule(
        r"(?<![\w-])name:[ \t]*(['\"]?)([A-Za-z0-9_.-]{1,128}+)\1[ \t]*\r?\n[ \t]*"
        rf"value:[ \t]*(['\"]?){_NOT_REDACTED}([^'\"\r\n]++)",
        _yaml_named_value,
        anchors=("name:",),
    ),
    # scheme://user:PASSWORD@host: user and host stay, the password goes (up to the last '@').
    _Rule(rf"://[^\s:/?#@'\"<>]*:{_NOT_REDACTED}([^\s/?#'\"<>]+)@", _group(1, "password")),
    # https://TOKEN@host: a token alone as the user of an http(s) or git URL.
    _Rule(rf"://{_NOT_REDACTED}([^\s:/?#@'\"<>\[\]]{{16,}}+)@", _url_token),
    # sk-... URL-encoded (`sk%2Dproj%2D...`), as a query string carries it.
    _Rule(
        r"(?:(?<=%3[Dd])|(?<![A-Za-z0-9_%-]))sk%2[Dd][A-Za-z0-9_%-]{20,}",
        _marker("openai_key"),
        anchors=("sk%2",),
    ),
    # Passwords on command lines: `curl -u user:PASSWORD`, `--password PASSWORD` (`=` is an assignment,
    # below), `mysql -pPASSWORD`, `sshpass -p PASSWORD`, and a netrc's `login user password PASSWORD`.
    _Rule(
        rf"(?<![^\s'\"])(?:-u|--user)(?:[ \t]+|=)['\"]?([^\s:'\"=]{{1,128}}):{_NOT_REDACTED}([^\s'\"]++)",
        _user_password,
        anchors=("-u", "--user"),
    ),
    _Rule(
        rf"(?<![\w-])--pass(?:word|wd)?[ \t]+{_NOT_REDACTED}(?:(['\"])([^'\"\r\n]*+)\1|([^\s'\"]++))",
        _password_flag,
        anchors=("--pass",),
    ),
    _Rule(
        rf"(?<![\w-])--(api-?key|label-?key|(?:auth-|access-)?token|(?:client-)?secret)[ \t]+{_NOT_REDACTED}"
        rf"(?:(['\"])([^'\"\r\n]*+)\2|([^\s'\"]++))",
        _key_flag,
        anchors=(
            "--api",
            "--label",
            "--token",
            "--auth-token",
            "--access-token",
            "--secret",
            "--client-secret",
        ),
    ),
    # An age secret key, and a PuTTY key file's private lines (a QA pass, session 25).
    _Rule(r"AGE-SECRET-KEY-1[0-9A-Z]{20,}", _marker("private_key")),
    _Rule(
        r"(Private-Lines:[ \t]*\d+\r?\n)((?:[A-Za-z0-9+/=]{1,128}\r?\n)*[A-Za-z0-9+/=]{1,128}(?=\r?\n|\Z))",
        _group(2, "private_key"),
    ),
    # `aws ssm get-parameter --with-decryption --output text`: the value follows its type.
    _Rule(r"(?i)\tSecureString\t([^\t\r\n]{1,4096})", _group(1, "secret"), anchors=("\tsecurestring\t",)),
    _Rule(
        rf"--(?<![\w-]--)([A-Za-z][\w-]{{1,63}})(?:(=)|[ \t]+){_NOT_REDACTED}['\"]?([^\s'\"]{{4,512}})",
        _named_flag,  # no anchors: `re` finds the literal `--` itself, and a PEM's `-----` never matches
    ),
    _Rule(
        rf"(?<![^\s'\"])-p([ \t]+)?+{_NOT_REDACTED}(?:(['\"])([^'\"\r\n]*+)\2|([^\s'\"]++))",
        _short_password_flag,
        anchors=("-p",),
    ),
    _Rule(
        rf"(?<![^\s'\"])(-a|--auth|-k|-P|-w|-pw|{'|'.join(_STORE_PASS)})(?:[ \t]+|(?<=--auth)=){_NOT_REDACTED}"
        rf"(?:(['\"])([^'\"\r\n]*+)\2|([^\s'\"]++))",
        _command_password_flag,
        anchors=(
            "-a",
            "--auth",
            "-k",
            "-p",
            "-w",
            "-storepass",
            "-keypass",
            "-srcstorepass",
            "-deststorepass",
            "-srckeypass",
            "-destkeypass",
        ),
    ),
    # openssl's `-passin pass:PW`, Samba's `-U user%PW`, `echo PW | sudo -S`.
    _Rule(
        rf"(?<![\w-])-pass(?:in|out)?[ \t]+pass:{_NOT_REDACTED}([^\s'\"]++)",
        _matched_group("password"),
        anchors=("-pass",),
    ),
    _Rule(
        rf"(?<![^\s'\"])(?:-U|--user)(?:[ \t]+|=)['\"]?([^\s%'\"]{{1,128}})%{_NOT_REDACTED}([^\s'\"]++)",
        _user_password,
        anchors=("-u", "--user"),
    ),
    _Rule(
        rf"(?<![\w-])(?:echo|printf)[ \t]+(?:-[neE]{{1,3}}[ \t]+)?{_NOT_REDACTED}(?:(['\"])([^'\"\r\n]*+)\1|([^\s'\"|;&]++))[ \t]*\|[ \t]*"
        rf"(?:sudo[ \t]+(?:-[^\sS]*[ \t]+)*-[A-Za-z]*S(?![\w-])|(?:sudo[ \t]+)?chpasswd\b"
        # what a registry login or `gh` reads from its input (a QA pass, session 21); within a
        # command's length: unbounded, each `login` of a long line scanned the rest of it (a review,
        # session 22: 5 s for a 64 KiB line of JSON)
        rf"|[^\n|;&]{{0,256}}?(?<![\w-])login(?![\w-])[^\n|;&]{{0,512}}?(?:--password-stdin|--with-token)\b)",
        _echoed_to_sudo,
        anchors=("echo", "printf"),
    ),
    # ... or from a here-string: `docker login -u bob --password-stdin <<< 'PW'` (a review, session 22).
    _Rule(
        rf"(?<![\w-])(?:--password-stdin|--with-token)\b[^\n|;&]{{0,256}}?<<<[ \t]*{_NOT_REDACTED}"
        r"(?:(['\"])([^'\"\r\n]*+)\1|([^\s'\"|;&]++))",
        _echoed_to_sudo,
        anchors=("--password-stdin", "--with-token"),
    ),
    _Rule(rf"(?<![\w-])password[ \t]+{_NOT_REDACTED}([^\s'\"]++)", _netrc_password, anchors=("password",)),
    # SQL: `CREATE USER bob IDENTIFIED BY 'pw'` (MySQL, Oracle; `... WITH plugin BY`, `BY PASSWORD`).
    _Rule(
        rf"(?i)\bidentified[ \t]+(?:with[ \t]+[\w'\"]{{1,64}}[ \t]+)?by[ \t]+(?:password[ \t]+)?"
        rf"(?:(['\"])({_NOT_REDACTED}[^'\"\r\n]{{1,256}})\1|({_NOT_REDACTED}[^\s'\";]{{1,256}}))",
        _matched_group("password"),
        anchors=("identified",),
    ),
    # SQL: PostgreSQL's `CREATE ROLE app LOGIN PASSWORD 'pw'`, `ALTER USER app WITH [ENCRYPTED]
    # PASSWORD 'pw'`; MySQL's `SET PASSWORD [FOR 'u'@'h'] = 'pw'` and `PASSWORD('pw')`.
    _Rule(
        rf"(?i)\bpassword(?:[ \t]+for[ \t]+[^=\r\n]{{1,128}}?)?(?:[ \t]*=[ \t]*|[ \t]*\([ \t]*|[ \t]+)"
        rf"(['\"]){_NOT_REDACTED}([^'\"\r\n]{{1,256}})\1",
        _matched_group("password"),
        anchors=("password",),
    ),
    # ... also after a mere space (`aws_secret_access_key wJalr...`), where only a 40-character key counts.
    _Rule(
        rf"(?i)(?:aws_?secret_?access_?key|aws_?secret_?key|secret_?access_?key)"
        rf"(?:{_SEP}{_NOT_REDACTED}([A-Za-z0-9/+=]{{16,}})|[ \t]+([A-Za-z0-9/+]{{40}})(?![A-Za-z0-9/+=]))",
        _matched_group("aws_secret_key"),
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
        rf"(?i)(?:api-key|auth-token|access-token|private-token|subscription-key){_SEP}{_NOT_REDACTED}([^\s'\"`,;\\]{{6,}})",
        _group(1, "api_key"),
        anchors=("api-key", "auth-token", "access-token", "private-token", "subscription-key"),
    ),
    _Rule(
        rf"(?i)cookie\\?['\"]?[ \t]*:[ \t]*\\?['\"]?{_NOT_REDACTED}([^\r\n'\"\\]+)",
        _group(1, "cookie"),
        anchors=("cookie",),
    ),
    # Name/value entries and pairs written out as text (JSON, a Python repr, keyword arguments), as a
    # tool's dict result reaches the model: `{"name": "DB_PASSWORD", "value": "..."}`, `name='...',
    # value='...'`, and a pair inside a list, `[["X-Api-Key", "..."], ...]`.
    _Rule(
        rf"(?i)(?<![\w-])(?:name|key){_QUOTE_OPEN}[ \t]*[:=][ \t]*{_QUOTE}([A-Za-z0-9_.-]{{1,128}}+){_QUOTE}"
        rf"(?:[ \t]*,[ \t]*|[ \t]+){_QUOTE_OPEN}value{_QUOTE_OPEN}[ \t]*[:=][ \t]*{_QUOTE}{_NOT_REDACTED}([^'\"\\\r\n]++)",
        _named_value,
        anchors=("name", "key"),
        requires="alue",
    ),
    _Rule(
        rf"[\[,][ \t]*[\[(][ \t]*{_QUOTE}([A-Za-z0-9_.-]{{1,128}}+){_QUOTE}[ \t]*,[ \t]*{_QUOTE}"
        rf"{_NOT_REDACTED}([^'\"\\\r\n]++){_QUOTE}[ \t]*[\])]",
        _named_value,
    ),
    # A QA pass (session 21): shapes an attacker's agent got to the store.
    # Mailgun's `key-<32 hex>`.
    _Rule(r"(?<![\w-])key-[0-9a-f]{32}(?![\w-])", _whole("api_key"), anchors=("key-",)),
    # A URL's `?key=` (Google Maps) or `&signature=` with a credential's shape.
    _Rule(
        rf"[?&](?:key|signature|sig|apikey|access_key)={_NOT_REDACTED}([^&\s#'\"<>]{{16,}})",
        _random_group(1, "api_key"),
        anchors=(
            "?key=",
            "&key=",
            "?signature=",
            "&signature=",
            "?sig=",
            "&sig=",
            "?apikey=",
            "&apikey=",
            "?access_key=",
            "&access_key=",
        ),
    ),
    # Oracle's `sqlplus user/PW@db`, `htpasswd -b FILE USER PW`, FreeRDP's `/p:PW`.
    _Rule(
        rf"(?<![\w-])sqlplus[ \t]+(?:-\w+[ \t]+)*[^\s/@-][^\s/@]*/{_NOT_REDACTED}([^\s@]+)",
        _group(1, "password"),
        anchors=("sqlplus",),
    ),
    _Rule(
        rf"(?<![\w-])htpasswd[ \t]+-[A-Za-z]*b[A-Za-z]*[ \t]+(?:-[A-Za-z]+[ \t]+)*\S+[ \t]+\S+[ \t]+{_NOT_REDACTED}"
        r"(?:(['\"])([^'\"\r\n]*+)\1|([^\s'\"]++))",
        _command_password,
        anchors=("htpasswd",),
    ),
    _Rule(
        rf"(?<![\w-])openssl[ \t]+passwd(?:[ \t]+-(?:salt[ \t]+\S+|\S+))*[ \t]+{_NOT_REDACTED}"
        r"(?:(['\"])([^'\"\r\n]*+)\1|([^\s'\")]++))",
        _command_password,
        anchors=("openssl",),
    ),
    # (FreeRDP's only: MSBuild's `/p:Configuration=Release` is a property, a review, session 22.)
    _Rule(
        rf"(?i)freerdp(?:[^\r\n\\]|\\\r?\n|\\){{0,512}}?(?<=[\s'\",\[])/p:{_NOT_REDACTED}([^\s'\"]+)",
        _group(1, "password"),
        anchors=("freerdp",),
    ),
    # In a sentence: "the password is X", "Your API key: X", "your access token is X" (X shaped as one).
    _Rule(
        r"(?i)(?<![\w-])(passwor[dt]|kennwort|mot de passe|passphrase|passcode|api[ _-]?key|(?:access |auth |api |bearer )?token|secret)"
        # "is X", "is: X", "is now X", "has been reset to X", "for bob: X" (a QA pass, session 23), "est X"
        r"(?:(?: is| was| ist| lautet| est)(?: now| jetzt)?:?|(?: has been| was| is)? (?:re)?(?:set|changed|updated) to| to"
        r"| for [^\s:]{1,64}:|:|=)"
        rf"[ \t]+(?:['\"`])?{_NOT_REDACTED}([^\s'\"`,;]+)",
        _sentence_secret,
        anchors=(
            "passwor",
            "kennwort",
            "mot de passe",
            "passphrase",
            "passcode",
            "api",
            "token",
            "access",
            "auth",
            "bearer",
            "secret",
        ),
    ),
    # Windows' `net user bob PW /add`, `useradd -p PW` / `usermod -p PW` (a QA pass, session 23).
    _Rule(
        rf"(?i)(?<![\w-])net[ \t]+user[ \t]+(?:\"[^\"\r\n]{{1,64}}\"|[^\s/\"]{{1,64}})[ \t]+{_NOT_REDACTED}"
        r"(?:(\")([^\"\r\n]*+)\1|(?![/*])([^\s\"]++))",
        _command_password,
        anchors=("net",),
    ),
    _Rule(
        rf"(?<![\w-])(?:useradd|usermod|adduser)(?:[ \t]+[^\s|;&]+)*?[ \t]+(?:-p|--password)[ \t]+{_NOT_REDACTED}"
        r"(?:(['\"])([^'\"\r\n]*+)\1|([^\s'\"]++))",
        _command_password,
        anchors=("useradd", "usermod", "adduser"),
    ),
    # `vault login TOKEN`; `aws configure set aws_secret_access_key X`, `git config user.password X`,
    # `npm config set //registry/:_authToken X`: a setting named for a secret, then its value.
    _Rule(
        rf"(?<![\w-])vault[ \t]+login[ \t]+(?:-[\w-]+(?:=\S*)?[ \t]+)*(?![-\w]+=){_NOT_REDACTED}([^\s'\"]++)",
        _group(1, "token"),
        anchors=("vault",),
    ),
    _Rule(
        # (Possessive: `./configure --a --b ...` failing the rule was retried 2^n ways, a review, session 23.)
        r"(?<![\w-])config(?:ure)?(?:[ \t]+set|:set)?[ \t]++(?:--?+[\w-]++[ \t]++)*+(?!set-)(\w[\w.:/@-]{0,127})[ \t]+"
        rf"{_NOT_REDACTED}(?:(['\"])([^'\"\r\n]*+)\2|(?!-)([^\s'\"]++))",
        _config_setting,
        anchors=("config",),
    ),
    # Terraform: `variable "db_password" { default = "X" }`.
    _Rule(
        rf"variable[ \t]+\"([^\"\r\n]{{1,128}})\"[ \t]*\{{[^{{}}]{{0,512}}?default[ \t]*=[ \t]*\"{_NOT_REDACTED}([^\"\r\n]+)\"",
        _terraform_default,
        requires="default",
    ),
    # SQL: `INSERT INTO users (name, password) VALUES ('bob', 'PW')`.
    _Rule(
        r"(?i)(?<![\w-])insert[ \t]+into[ \t]+[\w.\"`\[\]]+[ \t]*\(([^()\r\n]{1,512})\)[ \t]*values[ \t]*\(([^()\r\n]{1,4096})\)",
        _sql_insert,
        anchors=("insert",),
    ),
    # A passphrase is words: unquoted (`passphrase: correct horse battery staple`), the rest of its line.
    _Rule(
        rf"(?i)(?<![A-Za-z])passphrase(?![A-Za-z0-9_])[ \t]*[:=][ \t]*(?![\\'\"`])"
        rf"{_NOT_REDACTED}([^\s'\"`][^\r\n'\"`]*?)[ \t]*(?=$|[\r\n'\"`])",
        _group(1, "password"),
        anchors=("passphrase",),
    ),
    # password = '...', "api_key": "...", TOKEN=..., secret: ... The name must end at the operator, so
    # "max_tokens = 5" and "token_count: 3" stay; a bare "key = ..." is ordinary code and stays too.
    _Rule(
        # (`PASSWORT`, `Kennwort`, `senha`...; `password_confirmation`, `password2`: a review, session 23.)
        r"(?i)((?:passw(?:or[dt]|d)|kennwort|senha|wachtwoord|salasana)(?:[_-]?(?:confirmation|confirm|again|repeat|new|old|current|[0-9]))?"
        r"|(?-i:(?<=[A-Za-z0-9]_)(?:PASS|pass))|(?<![A-Za-z0-9-])(?<![A-Za-z0-9]_)auth|pwd|passphrase|contrase(?:ñ|n)a|"
        r"(?-i:SECRET_KEY_BASE|(?<=[A-Z0-9]_)KEY)|(?<![\w.-])pass(?=['\"]?[ \t]*[:=][ \t]*['\"])|secret|token|"
        + _after("api", "access", "private", "auth", "secret", "client", "label")
        + r"key)(?![A-Za-z0-9_])"
        r"([\\'\"\]]{0,9}[ \t]*(?:=>|:=|==?|:|%3[Dd])[ \t]*)"
        # Quoted (a Python `u'...'` too): up to the same quote, past the other kind and escapes
        # (`"it's"`, `"ab\"cd"`); inside an escaped string (`\"...\"`, JSON in JSON), up to `\`.
        rf"(?:(?:[rRuUbB]{{1,2}}(?=['\"]))?(\\{{1,7}})?(['\"`]){_NOT_REDACTED}"
        r"((?(3)[^'\"`\r\n\\]++|(?:(?!\4)[^\r\n\\]|\\[^\r\n])++))(?(3)\\{1,7})\4"
        # Unquoted: to a space or a closing bracket; past `& , ; )` inside the value
        # (`DB_PASSWORD=Tr0ub4dor&3x`), not where a next `name=` follows (`?password=x&user=bob`).
        rf"|(?![\\'\"`\[]|\((?=['\"]))([^\s'\"`,;&)}}\]\\]+"
        rf"(?:[&,;)}}\]](?![A-Za-z_][\w.-]*[=:])[^\s'\"`,;&)}}\]\\]+)*))",
        _assignment,
        anchors=(
            "passw",
            "pass",
            "auth",
            "pwd",
            "passphrase",
            "contrase",
            "secret",
            "token",
            "key",
            "kennwort",
            "senha",
            "wachtwoord",
            "salasana",
        ),
    ),
    # `"<name>": "<value>"` in text (JSON or a dict in a message), the name one `secret_key_kind`
    # knows: `call login {"otp": "...", "pin_code": "..."}` (a QA pass, session 24).
    _Rule(
        rf"[\"'][ \t]*:[ \t]*([\"']){_NOT_REDACTED}([^\"'\r\n]{{1,256}})\1", _quoted_named_value, requires=":"
    ),
    # A bot token of Telegram's (`<bot id>:AA...`), in its API's URL or alone; the bot's id stays.
    _Rule(r":AA[0-9A-Za-z_-]{30,40}(?![\w-])", _telegram_token, requires=":AA"),
    # A crypt(3) hash (`htpasswd`'s `$apr1$`, bcrypt's `$2b$`, `$6$`, yescrypt's `$y$`, argon2): crackable.
    _Rule(
        r"\$(?:apr1|2[abxy]|1|5|6|7|y|gy|argon2(?:id|i|d))\$[./A-Za-z0-9$=,+-]{8,512}+",
        _marker("password_hash"),
        requires="$",
    ),
    # A `.pgpass` line: `host:port:database:user:PASSWORD`.
    _Rule(
        rf"(?m):(?:\d{{1,5}}|\*):([^\s:]{{1,256}}+):([^\s:]{{1,256}}+):{_NOT_REDACTED}(\S{{1,256}}+)$",
        _pgpass_line,
        requires=":",
    ),
    # YAML's and an INI's unquoted `pass: X` / `pass = X` on a line of its own, X shaped as a credential.
    _Rule(
        rf"(?im)(?<![\w.-])pass([ \t]*[:=][ \t]*){_NOT_REDACTED}(?!['\"])([^\s#'\"]{{1,256}}+)[ \t]*$",
        _unquoted_pass,
        anchors=("pass",),
    ),
    # Words after a colon: "The password is: purple monkey dishwasher 42".
    _Rule(
        rf"(?i)(?<![\w-])(passwor[dt]|passphrase)(?: is| was)?:[ \t]+{_NOT_REDACTED}(?!['\"`])"
        r"([^\r\n'\"`]{1,160}?)[ \t]*(?=$|\r|\n|[.!?](?:\s|$))",
        _passphrase_after_colon,
        anchors=("passwor", "passphrase"),
    ),
    # An AWS secret access key in prose: "secret key wJalr...", "with secret wJalr..." (40 characters).
    _Rule(
        rf"(?i)secret(?:[ \t]+access)?(?:[ \t]+key)?(?:[ \t]+is)?:?[ \t]+{_NOT_REDACTED}"
        r"([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])",
        _aws_secret_in_prose,
        anchors=("secret",),
    ),
    # requests' `auth=("user", "PW")`, `HTTPBasicAuth("user", "PW")`.
    _Rule(
        r"(?i)(?:(?<![A-Za-z0-9_])auth[ \t]*=[ \t]*\(|http(?:basic|digest)auth\()[ \t]*(['\"])[^'\"\r\n]*\1"
        rf"[ \t]*,[ \t]*(['\"]){_NOT_REDACTED}([^'\"\r\n]+)\2",
        _matched_group("password"),
        anchors=("auth", "httpbasicauth", "httpdigestauth"),
    ),
)


_DETECT_SECRETS = DetectSecrets()
