"""
The device source reads FIFOs, files and character devices without blocking the
event loop, reports EOF and errors as SourceError, and can have a read
cancelled (by the supervisor's watchdog) without leaking a reader, a thread's
descriptor or bytes into the next read.
"""

import asyncio
import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from broker.errors import SourceError
from sources.device import DeviceSource, DeviceSourceConfig, access_problem, may_skip
from sources.getrandom import GetrandomSource, GetrandomSourceConfig


def device(path: Path, **extra: object) -> DeviceSource:
    config = DeviceSourceConfig.model_validate(
        {"name": "dev", "kind": "device", "path": str(path), **extra}
    )
    return DeviceSource(config)


async def test_fifo_bytes_arrive_as_written(tmp_path: Path) -> None:
    """
    A program writing into a named pipe feeds the source byte for byte.
    """
    fifo = tmp_path / "feed"
    os.mkfifo(fifo)
    async with device(fifo) as source:
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(writer, b"\x01\x02\x03")
            async with asyncio.timeout(5):
                assert b"\x01\x02\x03" == await source.read()
        finally:
            os.close(writer)


async def test_fifo_waits_for_a_writer_without_blocking_the_loop(
    tmp_path: Path,
) -> None:
    """
    With no writer yet, a read waits while the event loop keeps running.
    """
    fifo = tmp_path / "feed"
    os.mkfifo(fifo)
    async with device(fifo) as source:
        reader = asyncio.create_task(source.read())
        await asyncio.sleep(0)
        assert not reader.done()
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(writer, b"late")
            async with asyncio.timeout(5):
                assert b"late" == await reader
        finally:
            os.close(writer)


async def test_fifo_feeder_restart_is_a_stall_not_eof(tmp_path: Path) -> None:
    """
    When the feeding program exits the source neither spins on EOF nor fails:
    the read waits (for the supervisor's watchdog to judge), and a new feeder
    resumes it.
    """
    fifo = tmp_path / "feed"
    os.mkfifo(fifo)
    async with device(fifo) as source:
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.write(writer, b"x")
        os.close(writer)
        assert b"x" == await source.read()
        reader = asyncio.create_task(source.read())
        await asyncio.sleep(0)
        assert not reader.done()
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(writer, b"y")
            async with asyncio.timeout(5):
                assert b"y" == await reader
        finally:
            os.close(writer)


async def test_regular_file_is_read_then_eof(tmp_path: Path) -> None:
    """
    A regular file (not pollable) is read in a thread, then reports EOF.
    """
    path = tmp_path / "data.bin"
    path.write_bytes(b"a" * 10_000)
    async with device(path, read_size=4096) as source:
        sizes = [len(await source.read()) for _ in range(3)]
        with pytest.raises(SourceError, match="end of file"):
            await source.read()
    assert [4096, 4096, 1808] == sizes


async def test_missing_device_is_a_clear_error(tmp_path: Path) -> None:
    """
    An absent path fails at open with the path and the reason.
    """
    with pytest.raises(SourceError, match=r"cannot open .*absent.*No such file"):
        async with device(tmp_path / "absent"):
            pass


def refuse_open(monkeypatch: pytest.MonkeyPatch, path: Path, code: int) -> None:
    """
    Make opening ``path`` fail with ``code``: the suite runs as root in CI, and
    root opens a mode-000 file all the same.
    """
    real_open = os.open

    def fake_open(target: object, *args: Any, **kwargs: Any) -> int:
        if Path(str(target)) == path:
            raise OSError(code, os.strerror(code), str(target))
        return real_open(target, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", fake_open)


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM])
async def test_permission_denied_is_reported_until_an_open_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """
    A device the broker may not open fails with "permission denied" and the
    path, and says so through ``unavailable`` until it opens again (the
    operator fixed the mode).
    """
    path = tmp_path / "hwrng"
    path.write_bytes(b"\x00" * 64)
    source = device(path)
    with monkeypatch.context() as patch:
        refuse_open(patch, path, code)
        with pytest.raises(
            SourceError, match=r"cannot open .*hwrng: permission denied"
        ):
            async with source:
                pass
    assert f"cannot open {path}: permission denied" == source.unavailable
    async with source:
        assert source.unavailable is None


@pytest.mark.parametrize(
    ("optional", "present", "expected"),
    [
        pytest.param(True, False, True, id="optional-absent-is-skipped"),
        pytest.param(True, True, False, id="optional-present-is-not"),
        pytest.param(False, False, False, id="required-absent-is-not"),
    ],
)
def test_only_an_absent_optional_device_may_be_skipped(
    tmp_path: Path, optional: bool, present: bool, expected: bool
) -> None:
    """
    ``optional`` forgives a device this machine lacks, not one it has but
    cannot open.
    """
    path = tmp_path / "hwrng"
    if present:
        path.write_bytes(b"")
    config = DeviceSourceConfig(
        name="hwrng", kind="hwrng", path=path, optional=optional
    )
    assert expected == may_skip(config)


def test_access_problem_names_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    check-config's view of a device path: absent, a directory, unreadable by
    this user, or fine.
    """
    device_path = tmp_path / "dev"
    device_path.write_bytes(b"")
    assert f"no such device {tmp_path / 'absent'}" == access_problem(
        tmp_path / "absent"
    )
    assert f"{tmp_path} is a directory, not a device" == access_problem(tmp_path)
    assert access_problem(device_path) is None
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    problem = access_problem(device_path)
    assert problem is not None
    assert problem.startswith(f"{device_path} is not readable by uid")


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def cancel(task: "asyncio.Task[bytes]") -> None:
    task.cancel()
    await asyncio.wait([task])
    assert task.cancelled()


async def test_cancelled_poll_read_leaves_nothing_behind(tmp_path: Path) -> None:
    """
    A pollable read cancelled (as the watchdog does) unregisters its reader,
    the source then closes its descriptor, and it reopens and reads again.
    """
    fifo = tmp_path / "feed"
    os.mkfifo(fifo)
    source = device(fifo)
    loop = asyncio.get_running_loop()
    async with source:
        fd = source._fd
        assert fd is not None
        reader = asyncio.create_task(source.read())
        await asyncio.sleep(0)
        await cancel(reader)
        assert not loop.remove_reader(fd)
    assert not fd_is_open(fd)
    async with source:
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(writer, b"again")
            async with asyncio.timeout(5):
                assert b"again" == await source.read()
        finally:
            os.close(writer)


def read_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "ebroker-device-read"}


def unpollable(path: Path) -> DeviceSource:
    """
    A device read by a blocking thread (as /dev/hwrng is), here a FIFO so that
    the test decides when the blocked read returns.
    """
    source = device(path)
    source._probe_pollable = lambda fd: False  # type: ignore[method-assign]
    return source


async def test_cancelled_thread_read_hands_its_fd_to_the_thread(
    tmp_path: Path,
) -> None:
    """
    A thread's read cannot be interrupted: when its wait is cancelled and the
    source closed, the descriptor stays open until the read returns, then the
    thread closes it; its bytes reach no later read.
    """
    fifo = tmp_path / "feed"
    os.mkfifo(fifo)
    source = unpollable(fifo)
    before = read_threads()
    async with source:
        fd = source._fd
        assert fd is not None
        reader = asyncio.create_task(source.read())
        await asyncio.sleep(0)
        (thread,) = read_threads() - before
        await cancel(reader)
    assert fd_is_open(fd)
    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        async with source:
            os.write(writer, b"dropped")
            await asyncio.to_thread(thread.join, 5)
            assert not thread.is_alive()
            assert not fd_is_open(fd)
            os.write(writer, b"fresh")
            async with asyncio.timeout(5):
                assert b"fresh" == await source.read()
    finally:
        os.close(writer)


async def test_read_after_a_cancelled_thread_read_gets_its_bytes(
    tmp_path: Path,
) -> None:
    """
    While the source stays open, a read after a cancelled one takes over the
    read still pending in the thread, so no byte is lost.
    """
    fifo = tmp_path / "feed"
    os.mkfifo(fifo)
    async with unpollable(fifo) as source:
        reader = asyncio.create_task(source.read())
        await asyncio.sleep(0)
        await cancel(reader)
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(writer, b"kept")
            async with asyncio.timeout(5):
                assert b"kept" == await source.read()
        finally:
            os.close(writer)


async def test_char_device_reads(tmp_path: Path) -> None:
    """
    A real character device (/dev/urandom stands in for /dev/hwrng) is read.
    """
    async with device(Path("/dev/urandom"), read_size=512) as source:
        assert 512 == len(await source.read())


async def test_getrandom_delivers_requested_size() -> None:
    """
    The getrandom source returns read_size bytes per read.
    """
    config = GetrandomSourceConfig(name="g", kind="getrandom", read_size=1000)
    async with GetrandomSource(config) as source:
        first, second = await source.read(), await source.read()
    assert 1000 == len(first) == len(second)
    assert first != second
