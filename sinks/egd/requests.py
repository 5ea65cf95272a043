"""
What one queued EGD request costs a connection: against the bound on input
requested but unanswered, and in the reply it is owed.
"""

from typing import Final

from sinks.egd.wire import (
    Event,
    GetLevel,
    GetPid,
    ReadBlocking,
    ReadNonBlocking,
    WriteEntropy,
)

MAX_QUEUED_REQUESTS: Final = 1024
"""Queued requests per connection before reading pauses, whatever their size:
parsing this many costs about a millisecond, and a QEMU guest keeps a handful."""


class Close:
    """
    Queued after the requests that preceded a protocol error or EOF.
    """


CLOSE: Final = Close()


def requested(event: Event) -> int:
    """
    What a queued request costs against ``max_pending_bytes``: the reply it
    is owed, or the data it carries, so a flood of any command is bounded.
    """
    match event:
        case ReadBlocking(count=count) | ReadNonBlocking(count=count):
            return max(count, 1)
        case WriteEntropy(data=data):
            return 4 + len(data)
        case GetPid():
            return 12
        case _:
            return 4


def reply_size(event: Event | Close) -> int:
    """
    The most bytes the reply to ``event`` can take.
    """
    match event:
        case ReadBlocking(count=count):
            return count
        case ReadNonBlocking(count=count):
            return 1 + count
        case GetPid():
            return 12
        case GetLevel():
            return 4
        case _:
            return 0
