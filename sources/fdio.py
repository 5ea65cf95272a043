"""
Non-blocking reads from a pollable file descriptor on the event loop.
"""

import asyncio
import os


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def read_when_ready(fd: int, size: int) -> bytes:
    """
    Read up to ``size`` bytes from non-blocking ``fd``, waiting (without
    blocking the loop) until the kernel says it is readable.

    Returns:
        The bytes read; ``b""`` at end of file.

    Raises:
        OSError: the read failed.
    """
    loop = asyncio.get_running_loop()
    while True:
        try:
            return os.read(fd, size)
        except BlockingIOError:
            pass  # nothing yet: wait for the kernel to say the fd is readable
        readable: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _resolve, readable)
        try:
            await readable
        finally:
            loop.remove_reader(fd)
