"""Tests for the typed channel codec: exact round trips, refused payloads and the dedup-key helpers."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import re
import typing
import uuid
from typing import Any

import bson
import pydantic
import pytest
from typing_extensions import TypedDict

from client.codec import TypedCodec, default_hash, hash_key
from client.errors import InvalidArgumentError, PayloadValidationError


@dataclasses.dataclass
class Address:
    city: str
    zip_code: str


@dataclasses.dataclass
class User:
    id: int
    username: str
    addresses: list[Address] = dataclasses.field(default_factory=list)


class UserDict(TypedDict):
    id: int
    username: str


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Order(pydantic.BaseModel):
    order_id: uuid.UUID
    placed_at: datetime.datetime
    total: decimal.Decimal
    colour: Colour
    note: str | None = None


def round_trip(data_type: Any, value: Any) -> Any:
    codec: TypedCodec[Any] = TypedCodec(data_type)
    return codec.decode(codec.encode(value))


def test_a_dataclass_with_a_nested_dataclass_and_a_list_round_trips_exactly() -> None:
    # Given a dataclass holding a list of nested dataclasses
    user = User(id=1, username="Peter", addresses=[Address("Berlin", "10115"), Address("Paris", "75001")])
    # When it is encoded and decoded
    decoded = round_trip(User, user)
    # Then an equal instance of the same class comes back
    assert type(decoded) is User
    assert decoded == user
    assert type(decoded.addresses[0]) is Address


def test_a_typed_dict_round_trips_as_an_equal_dict() -> None:
    # Given a TypedDict value
    user: UserDict = {"id": 7, "username": "Anna"}
    # When it is encoded and decoded
    decoded = round_trip(UserDict, user)
    # Then the same dict comes back
    assert decoded == user


def test_a_pydantic_model_with_datetime_uuid_decimal_enum_and_optional_round_trips_exactly() -> None:
    # Given a model using every value BSON cannot store natively (datetime at millisecond precision)
    order = Order(
        order_id=uuid.uuid4(),
        placed_at=datetime.datetime(2024, 5, 17, 12, 30, 45, 123000, tzinfo=datetime.UTC),
        total=decimal.Decimal("19.990000000000000000000000000001"),
        colour=Colour.BLUE,
    )
    # When it is encoded and decoded
    decoded = round_trip(Order, order)
    # Then an equal model comes back, with every field of its declared type
    assert decoded == order
    assert isinstance(decoded.order_id, uuid.UUID)
    assert decoded.colour is Colour.BLUE
    assert decoded.note is None


@pytest.mark.parametrize(
    ("data_type", "value"),
    [
        (int, 42),
        (int, -(2**63)),
        (str, "héllo ✓"),
        (list[str], ["a", "b", ""]),
        (dict[str, int], {"a": 1, "b": 2}),
        (bytes, b"\x00\xffbinary"),
        (float, 2.5),
        (bool, True),
        (int | None, None),
        (set[int], {1, 2, 3}),
        (tuple[int, str], (1, "a")),
        (dict[int, str], {1: "one", 2: "two"}),
        (datetime.date, datetime.date(2024, 2, 29)),
        (datetime.timedelta, datetime.timedelta(days=3, seconds=5, microseconds=7)),
        (decimal.Decimal, decimal.Decimal("1E+40")),
        (dict[str, Any], {"nested": {"list": [1, "two", None]}}),
    ],
)
def test_a_plain_type_round_trips_exactly(data_type: Any, value: Any) -> None:
    # Given a value of a plain type
    # When it is encoded and decoded
    decoded = round_trip(data_type, value)
    # Then an equal value of the same type comes back
    assert decoded == value
    assert type(decoded) is type(value)


def test_a_4_kb_string_payload_round_trips_exactly() -> None:
    # Given a 4 KB string
    text = "x" * 4095 + "✓"
    # When it is encoded and decoded
    decoded = round_trip(str, text)
    # Then the same string comes back
    assert decoded == text


def test_a_naive_datetime_is_taken_as_utc_and_comes_back_aware() -> None:
    # Given a naive datetime
    naive = datetime.datetime(2024, 1, 2, 3, 4, 5, 6000)
    # When it is encoded and decoded
    decoded = round_trip(datetime.datetime, naive)
    # Then the same wall time comes back, marked as UTC
    assert decoded == naive.replace(tzinfo=datetime.UTC)
    assert decoded.utcoffset() == datetime.timedelta(0)


def test_an_aware_datetime_keeps_its_instant_at_millisecond_precision() -> None:
    # Given an aware datetime in another zone with microseconds
    moment = datetime.datetime(
        2024, 1, 2, 3, 4, 5, 123456, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
    )
    # When it is encoded and decoded
    decoded = round_trip(datetime.datetime, moment)
    # Then the same instant comes back in UTC, truncated to BSON's milliseconds
    assert decoded == moment.replace(microsecond=123000)
    assert decoded.tzinfo == datetime.UTC


def test_the_body_is_a_bson_document_with_the_payload_under_v() -> None:
    # Given a codec for a plain type
    codec = TypedCodec(list[int])
    # When a value is encoded
    body = codec.encode([1, 2])
    # Then the body is a BSON document holding the value under "v"
    assert bson.decode(body) == {"v": [1, 2]}


def test_a_dataclass_instance_with_wrong_field_types_is_refused_with_the_field_named() -> None:
    # Given a dataclass instance whose fields hold the wrong types (dataclasses do not check)
    bad = User(id="x", username=3)  # type: ignore[arg-type]
    codec = TypedCodec(User)
    # When it is encoded
    with pytest.raises(PayloadValidationError) as caught:
        codec.encode(bad)
    # Then the error names the channel type and both fields
    message = str(caught.value)
    assert "channel type User" in message
    assert "id: Input should be a valid integer" in message
    assert "username:" in message
    assert "\n" not in message


def test_a_numeric_string_in_an_int_field_of_a_dataclass_instance_is_refused() -> None:
    # Given a dataclass instance whose int field holds a string that looks like a number
    bad = User(id="5", username="Peter")  # type: ignore[arg-type]
    # When it is encoded
    # Then it is refused rather than silently converted
    with pytest.raises(PayloadValidationError, match=r"id: expected int, got str '5'"):
        TypedCodec(User).encode(bad)


def test_a_wrong_type_deep_inside_a_nested_dataclass_is_refused_with_its_path() -> None:
    # Given a nested dataclass instance with a wrong field type
    bad = User(id=1, username="Peter", addresses=[Address(city=3, zip_code="1")])  # type: ignore[arg-type]
    # When it is encoded
    # Then the error gives the path to the field
    with pytest.raises(PayloadValidationError, match=r"addresses\[0\]\.city: Input should be a valid string"):
        TypedCodec(User).encode(bad)


def test_a_typed_dict_missing_a_key_is_refused() -> None:
    # Given a dict missing a required key of the TypedDict
    bad = {"id": 1}
    # When it is encoded
    # Then the error names the missing key
    with pytest.raises(PayloadValidationError, match=r"channel type UserDict: username: Field required"):
        TypedCodec(UserDict).encode(bad)  # type: ignore[arg-type]


def test_a_plain_dict_passed_to_a_dataclass_channel_is_refused() -> None:
    # Given a dict with the right fields, but not a User
    bad = {"id": 1, "username": "Peter"}
    # When it is encoded on a User channel
    # Then it is refused, saying a User was expected
    with pytest.raises(PayloadValidationError, match=r"expected User, got dict"):
        TypedCodec(User).encode(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data_type", "value"),
    [(int, "7"), (str, 7), (bytes, "text"), (list[int], [1, "x"]), (dict[str, int], {"a": "b"})],
)
def test_a_value_of_the_wrong_plain_type_is_refused(data_type: Any, value: Any) -> None:
    # Given a codec for a plain type and a value of another type
    codec: TypedCodec[Any] = TypedCodec(data_type)
    # When it is encoded
    # Then it is refused, naming the channel type
    with pytest.raises(PayloadValidationError, match=re.escape(f"channel type {codec.type_name}:")):
        codec.encode(value)


def test_nothing_is_returned_when_encoding_fails() -> None:
    # Given a payload that does not match
    codec = TypedCodec(int)
    body: bytes | None = None
    # When it is encoded
    with pytest.raises(PayloadValidationError):
        body = codec.encode("not a number")  # type: ignore[arg-type]
    # Then no body was produced
    assert body is None


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 2**80])
def test_an_integer_beyond_int64_is_refused_with_a_clear_error(value: int) -> None:
    # Given an integer BSON cannot store, deep inside an untyped payload
    payload = {"counts": [1, {"big": value}]}
    # When it is encoded
    # Then the error names where it is and why
    with pytest.raises(
        PayloadValidationError, match=r"counts\[1\]\.big: integer .* outside BSON's 64-bit range"
    ):
        TypedCodec(dict[str, Any]).encode(payload)


def test_an_object_bson_cannot_store_is_refused_with_its_path() -> None:
    # Given an untyped payload holding an arbitrary object
    payload = {"thing": object()}
    # When it is encoded
    # Then the error names the field
    with pytest.raises(PayloadValidationError, match=r"thing: .*cannot encode object"):
        TypedCodec(dict[str, Any]).encode(payload)


def test_decoding_a_message_of_another_type_says_it_does_not_match_the_consumer() -> None:
    # Given a body produced on an int channel
    body = TypedCodec(int).encode(3)
    # When a User consumer decodes it
    # Then the error says the stored message does not match its type
    with pytest.raises(
        PayloadValidationError, match=r"stored message does not match the consumer's type User"
    ):
        TypedCodec(User).decode(body)


@pytest.mark.parametrize("body", [b"garbage", bson.encode({"other": 1}), b""])
def test_decoding_a_body_that_is_not_a_codec_document_is_refused(body: bytes) -> None:
    # Given bytes that are not a codec document
    # When they are decoded
    # Then a payload error is raised, not a bson or key error
    with pytest.raises(PayloadValidationError, match=r"cannot be read as int"):
        TypedCodec(int).decode(body)


def test_a_type_pydantic_cannot_handle_is_refused_when_the_codec_is_built() -> None:
    # Given typing.TypedDict, which pydantic refuses on Python 3.11
    class OldStyle(typing.TypedDict):
        id: int

    # When a codec is built for it
    # Then the error names the type and what to use instead
    with pytest.raises(InvalidArgumentError, match=r"OldStyle cannot be a channel type"):
        TypedCodec(OldStyle)


@pytest.mark.parametrize(
    ("data_type", "name"),
    [(User, "User"), (int, "int"), (list[int], "list[int]"), (int | None, "int | None"), (Any, "Any")],
)
def test_type_name_is_readable(data_type: Any, name: str) -> None:
    # Given a codec for a type
    # When its name is asked for
    # Then it reads like the annotation
    assert TypedCodec(data_type).type_name == name


def test_default_hash_is_equal_for_equal_payloads_and_differs_for_different_ones() -> None:
    # Given two equal payloads and a different one, encoded
    codec = TypedCodec(User)
    first = codec.encode(User(1, "Peter"))
    same = codec.encode(User(1, "Peter"))
    other = codec.encode(User(2, "Peter"))
    # When their default hashes are taken
    # Then equal payloads hash equally, different ones differently, as 32-byte SHA-256 digests
    assert default_hash(first) == default_hash(same)
    assert default_hash(first) != default_hash(other)
    assert len(default_hash(first)) == 32


@pytest.mark.parametrize(
    ("value", "key"), [("order-1", b"order-1"), ("é", "é".encode()), (42, b"42"), (b"\x00raw", b"\x00raw")]
)
def test_hash_key_turns_str_int_and_bytes_into_bytes(value: str | bytes | int, key: bytes) -> None:
    # Given a user's hash argument
    # When it is turned into a key
    # Then str is UTF-8, int its decimal digits, bytes as they are
    assert hash_key(value) == key


def test_hash_key_accepts_exactly_256_bytes() -> None:
    # Given a 256-byte hash
    # When it is turned into a key
    # Then it is accepted unchanged
    assert hash_key(b"k" * 256) == b"k" * 256


@pytest.mark.parametrize("value", ["", b"", "k" * 257, b"k" * 257, True, 1.5])
def test_hash_key_refuses_empty_oversized_or_other_typed_values(value: Any) -> None:
    # Given a hash that is empty, too long or of another type
    # When it is turned into a key
    # Then an invalid-argument error is raised
    with pytest.raises(InvalidArgumentError, match=r"hash"):
        hash_key(value)
