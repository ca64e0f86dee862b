"""Feeding helpers: every parser test feeds its input whole, byte by byte, and with trailing bytes."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def all_chunkings(data: bytes, trailing: bytes = b"") -> list[list[bytes]]:
    """The input whole, split at every single byte boundary in two, and byte by byte; with `trailing` appended."""
    whole = data + trailing
    chunkings: list[list[bytes]] = [[whole], [whole[i : i + 1] for i in range(len(whole))]]
    # Two-piece splits at every boundary are O(n) cases; cap them for long inputs.
    step = max(1, len(whole) // 64)
    chunkings.extend([whole[:i], whole[i:]] for i in range(1, len(whole), step))
    return chunkings


def feed_all(feed: Callable[[bytes], Iterable[T]], chunks: Iterable[bytes]) -> list[T]:
    """Feed every chunk in order and collect the events."""
    return [event for chunk in chunks for event in feed(chunk)]
