"""A tokenizer's identity, recorded with the token ids it produced.

Token ids mean something only under the tokenizer that made them: a version trained from
another base (another vocabulary) read the recorded ids of its ancestors as other text, or as
ids past its embeddings. `LocalChatModel` records this id beside the ids it samples; training
uses recorded ids only where its own tokenizer has the same one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

_cache: dict[int, tuple[Any, str]] = {}


def tokenizer_id(tokenizer: Any) -> str:
    """A short hash of what decides the ids: the fast tokenizer's whole definition (vocabulary,
    merges, normaliser, added tokens), else the vocabulary and the special tokens."""
    hit = _cache.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
    else:
        definition = json.dumps(
            [sorted(tokenizer.get_vocab().items()), sorted(map(str, tokenizer.all_special_tokens))]
        )
    digest = hashlib.sha256(definition.encode()).hexdigest()[:16]
    _cache[id(tokenizer)] = (tokenizer, digest)
    return digest
