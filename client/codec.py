"""The typed channel codec: checks a payload against its channel's type and turns it into BSON and back.

A message body is one BSON document ``{"v": <payload>}``; the wrapper key lets plain types (``int``,
``list[str]``, ...) travel as well as dataclasses, TypedDicts and pydantic models. A
``pydantic.TypeAdapter`` built once per channel does the checking on both sides.

Values BSON cannot store are converted on the way in and rebuilt from the channel's type on the way
out (so a consumer declaring ``Any`` sees the stored form):

    Decimal            -> str (exact)           set, frozenset, tuple  -> array
    UUID               -> Binary subtype 4      Enum                   -> its value
    date (no time)     -> ISO string            timedelta              -> float seconds
    dict with int keys -> string keys           int beyond 64 bits     -> refused

Datetimes are stored as BSON dates: UTC, millisecond precision. A naive datetime is taken as UTC;
decoding always returns an aware datetime in UTC. On Python 3.11 a TypedDict must come from
``typing_extensions`` (pydantic refuses ``typing.TypedDict`` there).
"""

from __future__ import annotations

import datetime
import decimal
import enum
import hashlib
import re
import uuid
from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

import bson
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions, TypeRegistry
from bson.errors import BSONError
from pydantic import TypeAdapter, ValidationError
from pydantic.errors import PydanticUserError
from pydantic_core import PydanticSerializationError

from broker.protocol import MAX_HASH_BYTES
from client.errors import InvalidArgumentError, PayloadValidationError

T = TypeVar("T")

_PAYLOAD_KEY = "v"
_MAX_ERRORS_SHOWN = 5
_MAX_INPUT_CHARS = 60
_SERIALIZER_WARNING = re.compile(
    r"Expected `(?P<expected>[^`]+)`[^\[]*\[(?:field_name='(?P<field>[^']*)', )?"
    r"input_value=(?P<value>.*), input_type=(?P<type>\w+)\]"
)


def _to_bson_value(value: Any) -> Any:
    """Convert one value BSON cannot store natively; bson calls this and re-encodes the result."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, datetime.date):  # datetimes are native; only a bare date reaches here
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, set | frozenset):
        return list(value)
    return value  # bson then raises InvalidDocument (or OverflowError for a too-large int)


_CODEC_OPTIONS: CodecOptions[dict[str, Any]] = CodecOptions(
    tz_aware=True,
    tzinfo=datetime.UTC,
    uuid_representation=UuidRepresentation.STANDARD,
    type_registry=TypeRegistry(fallback_encoder=_to_bson_value),
)
_ENCODE_ERRORS = (BSONError, OverflowError, TypeError, ValueError)


def _encode_document(value: Any) -> bytes:
    """Encode ``{"v": value}`` with the codec's options."""
    result: bytes = bson.encode({_PAYLOAD_KEY: value}, codec_options=_CODEC_OPTIONS)
    return result


def _with_string_keys(value: Any) -> Any:
    """Rebuild ``value`` with int, UUID, Decimal, Enum and date dict keys turned into strings."""
    if isinstance(value, dict):
        return {_string_key(key): _with_string_keys(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_with_string_keys(item) for item in value]
    return value


def _string_key(key: Any) -> Any:
    """Return a dict key as the string BSON needs, or unchanged when it has no faithful string form."""
    if isinstance(key, enum.Enum):
        key = key.value
    if isinstance(key, bool) or not isinstance(key, int | uuid.UUID | decimal.Decimal | datetime.date):
        return key
    return key.isoformat() if isinstance(key, datetime.date) else str(key)


def _find_unencodable(value: Any, path: str) -> tuple[str, str] | None:
    """Return the path of the innermost part of ``value`` BSON refuses and why, or None if it encodes."""
    try:
        _encode_document(value)
    except _ENCODE_ERRORS as exc:
        reason = str(exc)
    else:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return path, f"integer {_short_repr(value)} is outside BSON's 64-bit range (-2**63 .. 2**63-1)"
    children: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        children = [(f"{path}.{key}" if path else str(key), item) for key, item in value.items()]
    elif isinstance(value, list | tuple):
        children = [(f"{path}[{index}]", item) for index, item in enumerate(value)]
    for child_path, child in children:
        found = _find_unencodable(child, child_path)
        if found is not None:
            return found
    return path, reason


def _short_repr(value: Any) -> str:
    """Return ``repr(value)`` cut to a length that fits in an error message."""
    text = repr(value)
    return text if len(text) <= _MAX_INPUT_CHARS else text[: _MAX_INPUT_CHARS - 3] + "..."


def _describe_validation_error(error: ValidationError) -> str:
    """Summarise a pydantic ``ValidationError`` as ``path: problem (got input)`` clauses on one line."""
    clauses = []
    details = error.errors(include_url=False)
    for detail in details[:_MAX_ERRORS_SHOWN]:
        path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in detail["loc"])
        clause = f"{path.lstrip('.')}: {detail['msg']}" if path else str(detail["msg"])
        if detail["type"] != "missing":
            clause += f" (got {_short_repr(detail['input'])})"
        clauses.append(clause)
    if len(details) > _MAX_ERRORS_SHOWN:
        clauses.append(f"and {len(details) - _MAX_ERRORS_SHOWN} more")
    return "; ".join(clauses)


def _describe_serializer_error(error: PydanticSerializationError) -> str:
    """Summarise pydantic's serializer warnings as ``field: expected X, got Y value`` clauses."""
    clauses = []
    for match in _SERIALIZER_WARNING.finditer(str(error)):
        clause = f"expected {match['expected']}, got {match['type']} {match['value']}"
        clauses.append(f"{match['field']}: {clause}" if match["field"] else clause)
    return "; ".join(clauses) or " ".join(str(error).split())


def _type_name(data_type: Any) -> str:
    """Return a short readable name for a type: ``User``, ``list[int]``, ``int | None``."""
    if isinstance(data_type, type):
        return data_type.__name__
    return repr(data_type).replace("typing.", "").replace("typing_extensions.", "")


def default_hash(body: bytes) -> bytes:
    """Return the SHA-256 digest of an encoded body: the EXACTLY_ONCE dedup key when no ``hash`` is given."""
    return hashlib.sha256(body).digest()


def hash_key(value: str | bytes | int) -> bytes:
    """Turn a user's ``hash=`` argument into dedup-key bytes (str as UTF-8, int as its decimal digits).

    Raises:
        InvalidArgumentError: the value is of another type, empty, or longer than 256 bytes.
    """
    if isinstance(value, bytes):
        key = value
    elif isinstance(value, str):
        key = value.encode("utf-8")
    elif isinstance(value, int) and not isinstance(value, bool):
        key = str(value).encode("ascii")
    else:
        raise InvalidArgumentError(f"hash must be a str, bytes or int, not {type(value).__name__}")
    if not key:
        raise InvalidArgumentError("hash must not be empty; pass None to hash the message body instead")
    if len(key) > MAX_HASH_BYTES:
        raise InvalidArgumentError(
            f"hash is {len(key)} bytes, more than the {MAX_HASH_BYTES} allowed; pass a digest of it instead"
        )
    return key


class TypedCodec(Generic[T]):
    """Checks payloads against one channel type and converts them to and from BSON message bodies."""

    @overload
    def __init__(self: TypedCodec[T], data_type: type[T]) -> None: ...
    @overload
    def __init__(self: TypedCodec[Any], data_type: Any) -> None: ...
    def __init__(self, data_type: type[T] | Any) -> None:
        """Build the type's validator once.

        Raises:
            InvalidArgumentError: pydantic cannot build a schema for ``data_type``.
        """
        self.data_type: Any = data_type
        self._type_name = _type_name(data_type)
        try:
            adapter: TypeAdapter[T] = TypeAdapter(data_type)
            # The core serializer and validator directly: TypeAdapter's wrappers cost ~1 µs a call.
            self._dump: Callable[..., Any] = adapter.serializer.to_python
            self._validate: Callable[[Any], T] = adapter.validator.validate_python
        except (PydanticUserError, TypeError) as exc:  # schema-generation errors subclass both
            first_line = str(exc).splitlines()[0].rstrip(".") if str(exc) else type(exc).__name__
            raise InvalidArgumentError(
                f"{self._type_name} cannot be a channel type: {first_line}; use a dataclass, TypedDict, "
                "pydantic model or a plain type"
            ) from exc

    @property
    def type_name(self) -> str:
        """A readable name of the channel type, for messages."""
        return self._type_name

    def encode(self, value: T) -> bytes:
        """Check ``value`` against the channel type and return it as a BSON message body.

        Raises:
            PayloadValidationError: the value does not match the type or cannot be stored in BSON.
        """
        try:
            dumped = self._dump(value, mode="python", warnings="error")
            # Dumping does not re-check stdlib dataclass instances' fields; validating the dump does.
            self._validate(dumped)
        except PydanticSerializationError as exc:
            raise self._payload_error(self._describe_wrong_value(value, exc)) from None
        except ValidationError as exc:
            raise self._payload_error(_describe_validation_error(exc)) from None
        try:
            return _encode_document(dumped)
        except _ENCODE_ERRORS:
            pass
        # Slow path, taken only when the fast one failed: retry with string dict keys, else explain.
        with_string_keys = _with_string_keys(dumped)
        try:
            return _encode_document(with_string_keys)
        except _ENCODE_ERRORS as exc:
            path, reason = _find_unencodable(with_string_keys, "") or ("", str(exc))
        raise self._payload_error(f"{path}: {reason}" if path else reason) from None

    def decode(self, body: bytes) -> T:
        """Rebuild a typed payload from a BSON message body.

        Raises:
            PayloadValidationError: the body is not a codec document or does not match the channel type.
        """
        try:
            stored = bson.decode(body, codec_options=_CODEC_OPTIONS)[_PAYLOAD_KEY]
        except (BSONError, KeyError, TypeError, ValueError) as exc:
            raise PayloadValidationError(
                f"stored message is not a typed-channel body ({type(exc).__name__}: {exc}); "
                f"it cannot be read as {self._type_name}"
            ) from None
        try:
            return self._validate(stored)
        except ValidationError as exc:
            raise PayloadValidationError(
                f"stored message does not match the consumer's type {self._type_name}: "
                f"{_describe_validation_error(exc)}; was it produced with a different type for this channel?"
            ) from None

    def _describe_wrong_value(self, value: Any, error: PydanticSerializationError) -> str:
        """Explain a value the serializer rejected, preferring pydantic's validation messages."""
        try:
            self._validate(self._dump(value, mode="python", warnings=False))
        except ValidationError as exc:
            return _describe_validation_error(exc)
        except (PydanticSerializationError, TypeError, ValueError):
            pass
        return _describe_serializer_error(error)

    def _payload_error(self, problem: str) -> PayloadValidationError:
        """Build the error for a payload that cannot be sent on this channel."""
        return PayloadValidationError(f"payload does not match channel type {self._type_name}: {problem}")
