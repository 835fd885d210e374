"""A comparable view of a protobuf message descriptor's fields (used in and out of the pytest process)."""

from __future__ import annotations

from typing import Any


def field_shapes(descriptor: Any) -> list[dict[str, Any]]:
    """The fields of a message descriptor in declaration order: name, number, type, cardinality, presence."""
    return [
        {
            "name": f.name,
            "number": f.number,
            "type": f.type,
            "repeated": f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED,  # protobuf < 6
            "presence": f.has_presence,
            "type_name": (f.message_type or f.enum_type).full_name if (f.message_type or f.enum_type) else "",
        }
        for f in descriptor.fields
    ]
