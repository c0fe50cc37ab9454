"""The Thrift compact protocol, decoded into plain Python values and encoded back.

Parquet footers are Thrift compact structs. The training-file writer needs to move a few
integers inside them (byte offsets, row counts) and to splice lists of column chunks;
no parquet library exposes that, so this module reads a struct generically (no IDL:
every field keeps its id and wire type) and writes it back byte for byte.

A struct is a ``dict`` {field id: (wire type, value)}; a list or set is
``(element type, [values])``. Booleans inside containers keep their raw byte.
"""
from __future__ import annotations

import struct as _struct

STOP, TRUE, FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(13)


class ThriftError(ValueError):
    """The bytes are not a Thrift compact struct this module can handle."""


def _zigzag_decode(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _zigzag_encode(n: int) -> int:
    return (n << 1) ^ (n >> 63)


class _Reader:
    def __init__(self, data: bytes, pos: int = 0):
        self.data = data
        self.pos = pos

    def byte(self) -> int:
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        result = shift = 0
        while True:
            b = self.data[self.pos]
            self.pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7

    def value(self, ctype: int):
        if ctype in (I16, I32, I64):
            return _zigzag_decode(self.varint())
        if ctype == BINARY:
            n = self.varint()
            start = self.pos
            self.pos += n
            return bytes(self.data[start:self.pos])
        if ctype == STRUCT:
            return self.struct()
        if ctype in (LIST, SET):
            header = self.byte()
            size, etype = header >> 4, header & 0x0F
            if size == 15:
                size = self.varint()
            if etype in (TRUE, FALSE):  # booleans in containers are one raw byte each
                return etype, [self.byte() for _ in range(size)]
            return etype, [self.value(etype) for _ in range(size)]
        if ctype == BYTE:
            return self.byte()
        if ctype == DOUBLE:
            start = self.pos
            self.pos += 8
            return _struct.unpack("<d", self.data[start:self.pos])[0]
        raise ThriftError(f"unsupported Thrift compact type {ctype} at byte {self.pos}")

    def struct(self) -> dict:
        fields: dict = {}
        last = 0
        while True:
            header = self.byte()
            ctype = header & 0x0F
            if ctype == STOP:
                return fields
            delta = header >> 4
            fid = last + delta if delta else _zigzag_decode(self.varint())
            if ctype in (TRUE, FALSE):
                fields[fid] = (TRUE, ctype == TRUE)
            else:
                fields[fid] = (ctype, self.value(ctype))
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
        if ctype in (I16, I32, I64):
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
    reader = _Reader(memoryview(data))
    try:
        fields = reader.struct()
    except IndexError:
        raise ThriftError("Thrift struct ends early") from None
    if reader.pos != len(data):
        raise ThriftError(f"{len(data) - reader.pos} bytes after the Thrift struct")
    return fields


def encode_struct(fields: dict) -> bytes:
    """Encode a struct decoded by :func:`decode_struct` (possibly edited)."""
    writer = _Writer()
    writer.struct(fields)
    return bytes(writer.out)
