"""Streaming JSON for QuPath GeoJSON: one feature decoded at a time, in chunks.

Used by :mod:`histoscope.export.geojson`; the file is read in blocks and each
feature decoded with the C scanner of :mod:`json`, so a million cells never
exist as one parsed document.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from histoscope.errors import GeoJSONError

_CHUNK = 20_000
_DECODER = json.JSONDecoder()
_WS = frozenset(" \t\n\r")


class _Bad(ValueError):
    """One feature is malformed; the message is the reason."""


# ----------------------------------------------------------------- streaming
class _Stream:
    """Text read in blocks and decoded one JSON value at a time."""

    def __init__(self, fh, block: int = 1 << 22) -> None:
        self.fh, self.block, self.buf, self.pos, self.eof = fh, block, "", 0, False

    def _more(self) -> bool:
        data = self.fh.read(max(self.block, len(self.buf) - self.pos))  # doubles for big values
        if not data:
            self.eof = True
            return False
        self.buf = self.buf[self.pos :] + data
        self.pos = 0
        return True

    def peek(self) -> str:
        """The next character that is not white space ('' at the end)."""
        while True:
            buf, p, n = self.buf, self.pos, len(self.buf)
            while p < n and buf[p] in _WS:
                p += 1
            self.pos = p
            if p < n:
                return buf[p]
            if not self._more():
                return ""

    def take(self, allowed: str) -> str:
        c = self.peek()
        if not c or c not in allowed:
            raise ValueError(f"expected one of {allowed!r}, found {c or 'the end of the file'!r}")
        self.pos += 1
        return c

    def value(self) -> Any:
        if self.pos >= len(self.buf) or self.buf[self.pos] in _WS:
            self.peek()
        while True:
            try:
                obj, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                if not self._more():
                    raise
                continue
            if end == len(self.buf) and not isinstance(obj, dict | list | str) and self._more():
                continue  # a number may go on in the next block
            self.pos = end
            return obj


def _array(stream: _Stream) -> Iterator[Any]:
    stream.take("[")
    if stream.peek() == "]":
        stream.pos += 1
        return
    while True:
        yield stream.value()
        buf, p = stream.buf, stream.pos
        if p + 1 < len(buf) and buf[p] == "," and buf[p + 1] not in _WS:  # one feature a line
            stream.pos = p + 1
        elif p + 2 < len(buf) and buf[p] == "," and buf[p + 1] == "\n" and buf[p + 2] not in _WS:
            stream.pos = p + 2
        elif stream.take(",]") == "]":
            return


def _items(stream: _Stream) -> Iterator[Any]:
    """Each feature: of a FeatureCollection, of a bare array, or the one object itself."""
    first = stream.peek()
    if first == "[":
        yield from _array(stream)
    elif first == "{":
        stream.pos += 1
        members, features = {}, False
        while stream.peek() != "}":
            key = stream.value()
            stream.take(":")
            if key == "features" and stream.peek() == "[":
                features = True
                yield from _array(stream)
            else:
                members[key] = stream.value()
            if stream.take(",}") == "}":
                stream.pos -= 1
        stream.pos += 1
        if not features:
            yield members
    else:
        raise ValueError(f"not JSON: the file starts with {first or 'nothing'!r}")
    if stream.peek():
        raise ValueError("extra data after the end of the JSON document")


def _chunks(items: Iterator[Any], where: str) -> Iterator[tuple[int, list]]:
    """``(index of the first, features)`` in chunks; a syntax error names the feature."""
    chunk, start = [], 0
    try:
        for obj in items:
            chunk.append(obj)
            if len(chunk) == _CHUNK:
                yield start, chunk
                start, chunk = start + len(chunk), []
    except (ValueError, UnicodeDecodeError, OSError, EOFError, zlib.error) as exc:
        raise GeoJSONError(
            f"{where}: feature {start + len(chunk)}: not valid JSON ({exc})"
        ) from None
    if chunk:
        yield start, chunk


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC: millions of small acyclic lists would trigger it ~10x over."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _open_text(path: Path):
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8-sig") if gz else open(path, encoding="utf-8-sig")


# ------------------------------------------------------- coordinates cut out
#: A cut-out coordinate array is replaced by the string ``PLACE + its number``.
PLACE = "\ue000"  # a private-use character
_COORDS = re.compile(r'"coordinates"\s*:\s*(?=\[)')


class _Stripped(_Stream):
    """A :class:`_Stream` whose decoded text has every ``"coordinates"`` array cut out.

    Each array stays unparsed text in :attr:`spans` and its place in the JSON
    holds the string ``PLACE + number``, so decoding a feature builds no list
    for any vertex: the caller parses only the coordinates it needs (the cell
    outline, not the nucleus) with numpy. Text is cut only after a ``}`` (a
    coordinate array never holds one), so an array is never split between
    blocks. An array whose text cannot be cut safely (a string inside it) is
    left in place for the JSON decoder and its checks.
    """

    def __init__(self, fh, block: int = 1 << 22) -> None:
        super().__init__(fh, block)
        self.raw = ""
        self.spans: list[str] = []
        self.base = 0  # number of the first span still held

    def _more(self) -> bool:
        data = self.fh.read(max(self.block, len(self.buf) - self.pos))
        if data:
            raw = self.raw + data
            cut = raw.rfind("}") + 1
        else:
            raw, cut = self.raw, len(self.raw)
            if not raw:
                self.eof = True
                return False
        self.raw = raw[cut:]
        self.buf = self.buf[self.pos :] + self._strip(raw[:cut])
        self.pos = 0
        return True

    def _strip(self, text: str) -> str:
        out, s, find, spans = [], 0, text.find, self.spans
        at = find('"coordinates"')
        while at >= 0:
            k = at + 14
            if not text.startswith(":[", k - 1):  # white space around the colon
                m = _COORDS.match(text, at)
                if m is None:
                    at = find('"coordinates"', k)
                    continue
                k = m.end()
            end = find("}", k)
            end = len(text) if end < 0 else end
            quote = find('"', k, end)
            if quote >= 0:  # more members follow the array: it ends at the comma before them
                body = text[k:quote].rstrip()
                if not body.endswith(","):  # a string inside: the decoder says what is wrong
                    at = find('"coordinates"', k)
                    continue
                body = body[:-1]
            else:
                body = text[k:end]
            if body.count("[") != body.count("]"):  # a string inside (["a", 1]): left in place
                at = find('"coordinates"', k)
                continue
            out.append(text[s:k])
            out.append(f'"{PLACE}{self.base + len(spans)}"')
            spans.append(body)
            s = k + len(body)
            at = find('"coordinates"', s)
        out.append(text[s:])
        return "".join(out)

    def span(self, ref: str) -> str:
        """The coordinate text a placeholder stands for."""
        return self.spans[int(ref[1:]) - self.base]

    def release(self, ref: str) -> None:
        """Forget the spans before ``ref`` and itself (features already handled)."""
        n = int(ref[1:]) - self.base + 1
        del self.spans[:n]
        self.base += n
