"""`JsonSchema`: the final output (or a named tool call's arguments) as JSON, validated against a
JSON Schema or a pydantic model, optionally with reference values for some fields.

    >>> JsonSchema({"type": "object", "required": ["city"]})
    >>> JsonSchema(Booking, tool="submit_booking")          # a pydantic model, the call's arguments
    >>> JsonSchema()                                          # schema from metadata["schema"]

With `match_expected=True` (the default) a dict in `metadata["expected"]` names field values the
output must also have (dotted keys reach nested fields). Schema errors, with their JSON paths, go in
the verdict's evidence. Needs `jsonschema` for dict schemas (pydantic models validate themselves).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cache, lru_cache
from typing import Any, NamedTuple

from honed.trajectory import STRUCTURED_KEY, Trajectory, Verdict, is_truncated
from honed.verifiers import patterns
from honed.verifiers.outcome import agent_failed, final_output, tool_call_args
from honed.verifiers.protocol import BaseVerifier, CannotTell, verdict
from honed.verifiers.reference import answer_json, json_equal, parse_json

_MAX_ERRORS = 20
_MISSING = object()


class JsonSchema(BaseVerifier):
    """Validates structured output; `schema` is a JSON Schema dict, a pydantic model class, or None
    to read `metadata[schema_key]` per task."""

    def __init__(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        tool: str | None = None,
        schema_key: str = "schema",
        expected_key: str = "expected",
        match_expected: bool = True,
        name: str = "schema",
        version: str = "1",
        tags: Iterable[str] = (),
    ) -> None:
        self.schema, self.tool, self.schema_key = schema, tool, schema_key
        self.expected_key, self.match_expected = expected_key, match_expected
        self.name, self.version, self.tags = name, version, frozenset(tags)
        if isinstance(schema, dict):
            self._validator = _jsonschema_validator(schema)

    def applies_to(self, trajectory: Trajectory) -> bool:
        return self.schema is not None or self.schema_key in (trajectory.metadata or {})

    def check(self, t: Trajectory) -> Verdict:
        failed = agent_failed(t)
        if failed is not None:
            return verdict(False, f"the agent run failed: {failed}"[:500], agent_error=failed[:2000])
        data = self._data(t)
        if isinstance(data, _Unreadable):  # the agent's output: a fail, never "could not tell"
            return verdict(False, f"the answer is not JSON: {data.reason}"[:500])
        if data is _MISSING:
            return verdict(False, f"the agent never called {self.tool!r}", tool=self.tool)
        errors = self._errors(t, data)
        if errors:
            return verdict(
                False, f"{len(errors)} schema error(s): {errors[0]['message']}"[:500], schema_errors=errors
            )
        mismatches = self._mismatches(t, data)
        if mismatches:
            score = 1 - len(mismatches) / max(1, len(self._expected_fields(t)))
            return verdict(
                False,
                f"{len(mismatches)} field(s) differ from the reference",
                score=score,
                field_mismatches=mismatches,
            )
        return verdict(
            True,
            "valid against the schema" + (" and the reference fields" if self._expected_fields(t) else ""),
        )

    # -- helpers ------------------------------------------------------------------------------

    def _data(self, t: Trajectory) -> Any:
        if self.tool is not None:
            args = tool_call_args(t, self.tool)
            return _MISSING if args is None else args
        output = final_output(t)
        if isinstance(output, dict) and "answer" in output and len(output) > 1:
            # A message agent with a structured response (stored as the plain JSON its schema
            # describes, its type in metadata["output_types"]): validate the structured part.
            structured = output.get(STRUCTURED_KEY, _MISSING)
            if structured is not _MISSING:
                return _readable(structured)
        if isinstance(output, dict | list):
            return output
        return _readable(t.answer)

    def _errors(self, t: Trajectory, data: Any) -> list[dict[str, Any]]:
        schema = self.schema if self.schema is not None else (t.metadata or {}).get(self.schema_key)
        if schema is None:
            raise CannotTell(f"no schema: pass one or set metadata[{self.schema_key!r}]")
        if is_truncated(schema):
            raise CannotTell(f"metadata[{self.schema_key!r}] was truncated at capture")
        if isinstance(schema, type):
            return _pydantic_errors(schema, data)
        if isinstance(schema, str):
            schema = parse_json(schema)
        if not isinstance(schema, dict):
            raise CannotTell(f"the schema must be a JSON Schema object, not {type(schema).__name__}")
        validator = (
            self._validator
            if schema is self.schema
            else _cached_validator(json.dumps(schema, sort_keys=True))
        )
        found = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
        return [
            {
                "path": "/" + "/".join(str(p) for p in e.absolute_path),
                "message": e.message[:300],
                "rule": e.validator,
            }
            for e in found[:_MAX_ERRORS]
        ]

    def _expected_fields(self, t: Trajectory) -> dict[str, Any]:
        expected = (t.metadata or {}).get(self.expected_key) if self.match_expected else None
        return expected if isinstance(expected, dict) else {}

    def _mismatches(self, t: Trajectory, data: Any) -> dict[str, Any]:
        out = {}
        for field, want in self._expected_fields(t).items():
            got = _field(data, field)
            if got is _MISSING:
                out[field] = {"expected": want, "got": None, "missing": True}
            elif not json_equal(got, want):
                out[field] = {"expected": want, "got": got}
        return out


@lru_cache(maxsize=256)
def _cached_validator(schema_json: str) -> Any:
    """Per-task schemas repeat across trajectories: build (and check) each validator once."""
    return _jsonschema_validator(json.loads(schema_json))


def _jsonschema_validator(schema: dict[str, Any]) -> Any:
    try:
        import jsonschema
    except ImportError as exc:  # pragma: no cover - a packaging error, not a verdict
        raise ImportError("JsonSchema with a dict schema needs `pip install jsonschema`") from exc
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise CannotTell(f"the schema itself is invalid: {exc.message}") from exc
    bounded = _bounded_patterns(cls)
    return bounded(schema, format_checker=cls.FORMAT_CHECKER)


@cache
def _bounded_patterns(cls: Any) -> Any:
    """`cls` with its `pattern` and `patternProperties` matched within a deadline
    (`honed.verifiers.patterns`): the schema's pattern is the application's, the string it is
    matched against the agent's, and jsonschema's `re.search` could be made to run for ever."""
    import jsonschema

    def pattern(validator: Any, wanted: str, instance: Any, schema: dict[str, Any]) -> Any:
        if validator.is_type(instance, "string") and not patterns.search(wanted, instance):
            yield jsonschema.ValidationError(f"{instance!r} does not match {wanted!r}")

    def pattern_properties(validator: Any, properties: dict[str, Any], instance: Any, schema: Any) -> Any:
        if not validator.is_type(instance, "object"):
            return
        for wanted, subschema in properties.items():
            for key, value in instance.items():
                if patterns.search(wanted, key):
                    yield from validator.descend(value, subschema, path=key, schema_path=wanted)

    keywords = {"pattern": pattern, "patternProperties": pattern_properties}
    return jsonschema.validators.extend(cls, {k: v for k, v in keywords.items() if k in cls.VALIDATORS})


def _pydantic_errors(model: type, data: Any) -> list[dict[str, Any]]:
    from pydantic import ValidationError

    try:
        if isinstance(data, str | bytes):
            model.model_validate_json(data)  # type: ignore[attr-defined]
        else:
            model.model_validate(data)  # type: ignore[attr-defined]
    except ValidationError as exc:
        return [
            {"path": "/" + "/".join(str(p) for p in e["loc"]), "message": e["msg"][:300], "rule": e["type"]}
            for e in exc.errors()[:_MAX_ERRORS]
        ]
    return []


class _Unreadable(NamedTuple):
    reason: str


def _readable(text: Any) -> Any:
    try:
        return answer_json(text)
    except CannotTell as exc:
        return _Unreadable(exc.reason)


def _field(data: Any, dotted: str) -> Any:
    """`a.b` is the nested field; a literal "a.b" key only where there is none (an answer that
    has both, disagreeing, must not choose which one is checked)."""
    nested = _path(data, dotted)
    if nested is _MISSING and isinstance(data, dict) and dotted in data:
        return data[dotted]
    return nested


def _path(data: Any, dotted: str) -> Any:
    current = data
    for part in dotted.split("."):
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return _MISSING
    return current
