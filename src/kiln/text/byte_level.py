"""GPT-2's byte-level alphabet: the printable character that stands for each byte in a
byte-level BPE vocabulary (``bytes_to_unicode``), and its inverse."""

from __future__ import annotations

import functools


@functools.cache
def byte_decoder() -> dict[str, int]:
    """The byte each character of the byte-level alphabet stands for."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


@functools.cache
def byte_encoder() -> dict[int, str]:
    """The character of the byte-level alphabet for each byte."""
    return {b: c for c, b in byte_decoder().items()}
