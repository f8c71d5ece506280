"""The protobuf wire format, read without building messages: each field's number, wire type and
where its value lies. Used to look at bytes before a parser materialises them (a model's graph for
file references, an inference request for its entry counts).

Encoding: https://protobuf.dev/programming-guides/encoding/ (tags are varints of
`number << 3 | wire type`; groups, deprecated but still parsed, are walked and skipped).
"""

from __future__ import annotations

from collections.abc import Iterator

VARINT, FIXED64, LENGTH, GROUP_START, GROUP_END, FIXED32 = 0, 1, 2, 3, 4, 5
MAX_GROUP_DEPTH = 32  # groups nested in unknown fields; upb allows 100 of any nesting
_LOW_BYTES = bytes(range(0x80))  # the last byte of each varint


class WireError(ValueError):
    """The bytes are not protobuf wire format (truncated, a bad tag or a bad length)."""


def varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it."""
    result = shift = 0
    while pos < end:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            break
    raise WireError(f"a varint at byte {pos} is truncated or longer than 10 bytes")


def fields(data: bytes, start: int = 0, end: int = -1) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value, position after) of each field in data[start:end].

    `value` is the varint for VARINT, else where the value starts: a LENGTH value is
    data[value:after], a fixed one data[value:after], a group data[value:after] (its end tag
    excluded)."""
    end = len(data) if end < 0 else end
    pos = start
    while pos < end:
        number, kind, value, after, pos = field_at(data, pos, end)
        yield number, kind, value, after


def field_at(data: bytes, pos: int, end: int) -> tuple[int, int, int, int, int]:
    """The field at `pos`: as `fields` gives it, then where the next field starts."""
    tag = data[pos]
    if tag < 0x80:
        pos += 1
    else:
        tag, pos = varint(data, pos, end)
    number, kind = tag >> 3, tag & 7
    if number == 0:
        raise WireError(f"field number 0 at byte {pos}")
    if kind == LENGTH:
        length = data[pos] if pos < end else 0x80
        if length < 0x80:
            pos += 1
        else:
            length, pos = varint(data, pos, end)
        after = pos + length
        if after > end:
            raise WireError(f"field {number}: {length} bytes run past the end at byte {pos}")
        return number, kind, pos, after, after
    if kind == VARINT:
        value, after = varint(data, pos, end)
        return number, kind, value, after, after
    if kind in (FIXED32, FIXED64):
        after = pos + (4 if kind == FIXED32 else 8)
        if after > end:
            raise WireError(f"field {number}: a fixed-size value runs past the end")
        return number, kind, pos, after, after
    if kind == GROUP_START:
        after, close = _group_end(data, number, pos, end, 1)
        return number, kind, pos, after, close
    raise WireError(f"field {number}: wire type {kind} at byte {pos} is not a field")


def _group_end(data: bytes, number: int, pos: int, end: int, depth: int) -> tuple[int, int]:
    """Where the group that opened at `pos` ends (its end tag) and the position after that."""
    if depth > MAX_GROUP_DEPTH:
        raise WireError(f"groups nested deeper than {MAX_GROUP_DEPTH}")
    while pos < end:
        before = pos
        tag, pos = varint(data, pos, end)
        inner, kind = tag >> 3, tag & 7
        if kind == GROUP_END:
            if inner != number:
                raise WireError(f"group {number} closed by an end tag of {inner}")
            return before, pos
        if kind == VARINT:
            pos = varint(data, pos, end)[1]
        elif kind == LENGTH:
            length, pos = varint(data, pos, end)
            pos += length
        elif kind in (FIXED32, FIXED64):
            pos += 4 if kind == FIXED32 else 8
        elif kind == GROUP_START:
            pos = _group_end(data, inner, pos, end, depth + 1)[1]
        else:
            raise WireError(f"field {inner}: wire type {kind} is not a field")
    raise WireError(f"group {number} has no end tag")


def packed_count(data: bytes, start: int, end: int) -> int:
    """How many varints a packed field holds (the bytes under 0x80 end one each)."""
    chunk = data[start:end]
    return len(chunk) - len(chunk.translate(None, _LOW_BYTES))


__all__ = ["FIXED32", "FIXED64", "GROUP_START", "LENGTH", "VARINT", "WireError", "field_at",
           "fields", "packed_count", "varint"]  # fmt: skip
