"""Client-side checks of a request message before it is encoded.

betterproto2 encodes whatever a field holds: an ``int32`` of 2**32 + 1 goes out as 1, a ``None`` price as
0.0, a status of 2**32 + 5 as 5. The server cannot tell such a request from one that meant it, so the
client refuses it here: a value of the wrong Python type is a :class:`TypeError`, an integer its field
cannot hold or text that is not valid Unicode an :class:`orders.errors.InvalidArgument`. Amounts may be
given as ``int``, ``float`` or ``decimal.Decimal``.
"""

from __future__ import annotations

import dataclasses
import decimal
import functools
import numbers
from typing import Any

import betterproto2

from orders.errors import InvalidArgument

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
# The integer types of the contract's requests, and what each holds; any other type is left unchecked.
_INTEGER_RANGES = {betterproto2.TYPE_INT32: _INT32, betterproto2.TYPE_ENUM: _INT32, betterproto2.TYPE_INT64: _INT64}


def check_request(message: betterproto2.Message) -> None:
    """Raise TypeError or InvalidArgument for a field of ``message`` that would not be sent as given."""
    _check_message(message, "")


def _check_message(message: betterproto2.Message, path: str) -> None:
    for name, proto_type, optional, repeated in _fields(type(message)):
        value = getattr(message, name)
        where = f"{path}{name}"
        if optional and value is None:
            continue
        if not repeated:
            _check_value(proto_type, value, where)
        elif isinstance(value, list):
            for index, element in enumerate(value):
                _check_value(proto_type, element, f"{where}[{index}]")
        else:
            raise TypeError(f"{where} must be a list, not {type(value).__name__}")


@functools.cache
def _fields(message_type: type[betterproto2.Message]) -> tuple[tuple[str, str, bool, bool], ...]:
    """Each field's name, protobuf type, and whether it is optional or repeated."""
    metadata = [(field.name, betterproto2.FieldMetadata.get(field)) for field in dataclasses.fields(message_type)]
    return tuple((name, meta.proto_type, bool(meta.optional), bool(meta.repeated)) for name, meta in metadata)


def _check_value(proto_type: str, value: Any, name: str) -> None:
    if proto_type in _INTEGER_RANGES:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        low, high = _INTEGER_RANGES[proto_type]
        if not low <= value <= high:
            raise InvalidArgument(f"{name} must be from {low:,} to {high:,}, not {value:,}")
    elif proto_type == betterproto2.TYPE_DOUBLE:
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, decimal.Decimal)):
            raise TypeError(f"{name} must be a number, not {type(value).__name__}")
        try:
            float(value)
        except (ArithmeticError, ValueError):  # too large for a double (OverflowError), a signalling NaN
            raise InvalidArgument(f"{name} cannot be sent as a double, got {value!r}") from None
    elif proto_type == betterproto2.TYPE_STRING:
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, not {type(value).__name__}")
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            raise InvalidArgument(f"{name} is not valid Unicode text ({exc.reason} at {exc.start})") from None
    elif proto_type == betterproto2.TYPE_MESSAGE:
        _check_message(value, f"{name}.")
