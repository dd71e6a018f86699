"""Secrets out of everything honed keeps: the redaction rules, the key names that name a secret,
and detect-secrets' plugins. Below the store, so that whatever reaches it (captured steps,
verdicts, training settings) goes through the same rules."""

from honed.redaction.redact import Redactor, secret_key_kind

__all__ = ["Redactor", "secret_key_kind"]
