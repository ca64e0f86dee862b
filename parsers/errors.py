"""The only exceptions parsers raise: `ParseError` and its subclasses, each with a direction and a reason."""

from __future__ import annotations

from typing import ClassVar

from membrane.parsers.events import Direction, Reason


class ParseError(Exception):
    """The byte stream cannot be read as the protocol says. The connection's parser is unusable after it."""

    # A class constant per subclass (ClassVar: compiled with mypyc it stays a class attribute, not a slot).
    reason: ClassVar[Reason] = Reason.MALFORMED

    def __init__(self, message: str, *, direction: Direction, offset: int | None = None,
                 events_before: tuple[object, ...] = ()) -> None:
        super().__init__(message)
        self.direction = direction
        self.offset = offset  # byte offset into the stream where the problem was seen, when known
        # The events the same feed() completed before the bad bytes, in order. Framed protocols that carry
        # several messages per read (Kafka, DNS over TCP) fill it, so the valid requests pipelined before a
        # malformed one are still judged and answered: handle these first, then the error.
        self.events_before = events_before

    def __str__(self) -> str:
        where = f" at byte {self.offset}" if self.offset is not None else ""
        return f"{self.direction.value}: {self.args[0]}{where}"


class MalformedMessage(ParseError):
    reason = Reason.MALFORMED


class MessageTooLarge(ParseError):
    """A limit was crossed (header block, line, frame size). Never a reason to grow a buffer."""

    reason = Reason.TOO_LARGE


class LimitExceeded(MessageTooLarge):
    """A peer crossed a rate or count limit (HTTP/2 control-frame flood, rapid reset, too many streams,
    DNS queries outstanding). `limit` names it, as counters and flows do."""

    def __init__(self, message: str, *, direction: Direction, limit: str, offset: int | None = None,
                 events_before: tuple[object, ...] = ()) -> None:
        super().__init__(message, direction=direction, offset=offset, events_before=events_before)
        self.limit = limit


class ProtocolViolation(ParseError):
    """Well-formed bytes in an order the state machine does not allow."""

    reason = Reason.MALFORMED
