"""The Thrift compact protocol, decoded into plain Python values and encoded back.

Parquet footers are Thrift compact structs. The training-file writer needs to move a few
integers inside them (byte offsets, row counts) and to splice lists of column chunks;
no parquet library exposes that, so this module reads a struct generically (no IDL:
every field keeps its id and wire type) and writes it back byte for byte.

A struct is a ``dict`` {field id: (wire type, value)}; a list or set is
``(element type, [values])``. Booleans inside containers keep their raw byte. Any value
may also be :class:`Encoded`: bytes already encoded, written as they are (a footer's
parts can then be kept compact until the footer is written).
"""
from __future__ import annotations

import struct as _struct

STOP, TRUE, FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(13)


class ThriftError(ValueError):
    """The bytes are not a Thrift compact struct this module can handle."""


class Encoded(bytes):
    """A value already in the compact encoding (without its field header)."""


def _zigzag_decode(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _zigzag_encode(n: int) -> int:
    return (n << 1) ^ (n >> 63)


def _varint(data, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _read_value(data, pos: int, ctype: int):
    """Decode a value of wire type ``ctype`` at ``pos``; return it and the next position.

    Written as flat functions over (data, pos) rather than a reader object: a training
    file's footer holds ~17,000 column chunks and every one passes through here."""
    if ctype == I64 or ctype == I32 or ctype == I16:
        b = data[pos]
        if b < 0x80:
            return (b >> 1) ^ -(b & 1), pos + 1
        n, pos = _varint(data, pos)
        return (n >> 1) ^ -(n & 1), pos
    if ctype == STRUCT:
        return _read_struct(data, pos)
    if ctype == BINARY:
        n, pos = _varint(data, pos)
        if pos + n > len(data):
            raise IndexError(pos + n)
        return bytes(data[pos:pos + n]), pos + n
    if ctype == LIST or ctype == SET:
        header = data[pos]
        pos += 1
        size, etype = header >> 4, header & 0x0F
        if size == 15:
            size, pos = _varint(data, pos)
        if etype == TRUE or etype == FALSE:  # booleans in containers are one raw byte each
            if pos + size > len(data):
                raise IndexError(pos + size)
            return (etype, list(data[pos:pos + size])), pos + size
        items = []
        for _ in range(size):
            item, pos = _read_value(data, pos, etype)
            items.append(item)
        return (etype, items), pos
    if ctype == BYTE:
        return data[pos], pos + 1
    if ctype == DOUBLE:
        if pos + 8 > len(data):
            raise IndexError(pos + 8)
        return _struct.unpack_from("<d", data, pos)[0], pos + 8
    raise ThriftError(f"unsupported Thrift compact type {ctype} at byte {pos}")


def _read_struct(data, pos: int) -> tuple[dict, int]:
    fields: dict = {}
    last = 0
    while True:
        header = data[pos]
        pos += 1
        ctype = header & 0x0F
        if ctype == STOP:
            return fields, pos
        delta = header >> 4
        if delta:
            fid = last + delta
        else:
            n, pos = _varint(data, pos)
            fid = (n >> 1) ^ -(n & 1)
        if ctype == TRUE or ctype == FALSE:
            fields[fid] = (TRUE, ctype == TRUE)
        else:
            value, pos = _read_value(data, pos, ctype)
            fields[fid] = (ctype, value)
        last = fid


class _Writer:
    def __init__(self):
        self.out = bytearray()

    def varint(self, n: int) -> None:
        out = self.out
        while n >= 0x80:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        out.append(n)

    def value(self, ctype: int, value) -> None:
        if isinstance(value, Encoded):
            self.out += value
        elif ctype in (I16, I32, I64):
            self.varint(_zigzag_encode(value))
        elif ctype == BINARY:
            self.varint(len(value))
            self.out += value
        elif ctype == STRUCT:
            self.struct(value)
        elif ctype in (LIST, SET):
            etype, items = value
            if len(items) < 15:
                self.out.append((len(items) << 4) | etype)
            else:
                self.out.append(0xF0 | etype)
                self.varint(len(items))
            if etype in (TRUE, FALSE):
                self.out += bytes(items)
            else:
                for item in items:
                    self.value(etype, item)
        elif ctype == BYTE:
            self.out.append(value & 0xFF)
        elif ctype == DOUBLE:
            self.out += _struct.pack("<d", value)
        else:
            raise ThriftError(f"unsupported Thrift compact type {ctype}")

    def struct(self, fields: dict) -> None:
        last = 0
        for fid in sorted(fields):
            ctype, value = fields[fid]
            wire = (TRUE if value else FALSE) if ctype == TRUE else ctype
            if 0 < fid - last <= 15:
                self.out.append(((fid - last) << 4) | wire)
            else:
                self.out.append(wire)
                self.varint(_zigzag_encode(fid))
            if ctype != TRUE:
                self.value(ctype, value)
            last = fid
        self.out.append(STOP)


def decode_struct(data: bytes) -> dict:
    """Decode one Thrift compact struct that fills ``data`` exactly."""
    try:
        fields, pos = _read_struct(data, 0)
    except IndexError:
        raise ThriftError("Thrift struct ends early") from None
    if pos != len(data):
        raise ThriftError(f"{len(data) - pos} bytes after the Thrift struct")
    return fields


def encode_struct(fields: dict) -> bytes:
    """Encode a struct decoded by :func:`decode_struct` (possibly edited)."""
    writer = _Writer()
    writer.struct(fields)
    return bytes(writer.out)


def encode_value(ctype: int, value) -> Encoded:
    """``value`` of wire type ``ctype``, encoded once to be written as it is later."""
    writer = _Writer()
    writer.value(ctype, value)
    return Encoded(writer.out)
