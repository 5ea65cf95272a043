"""
The kernel sink's driver on a fake clock: a real pool, the recording stand-in
for the kernel, and a socket pair standing in for the uevent socket.
"""

import json
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import structlog

from broker.errors import BrokerError
from broker.pool import EntropyPool
from broker.status import BrokerView
from sinks.kernel import sink as sink_module
from sinks.kernel.config import KernelSinkConfig
from sinks.kernel.device import detect_semantics
from sinks.kernel.plan import KernelState
from sinks.kernel.record import RecordingKernel
from sinks.kernel.sink import KernelSink
from sinks.kernel.wire import Semantics
from tests.fakeclock import FakeClock, settle
from tests.sinks.kernel.test_wire import USB_ADD_UEVENT, VMGENID_UEVENT


@dataclass
class FakeBroker:
    pool: EntropyPool
    state_dir: Path


def fill(pool: EntropyPool, nbytes: int = 4096) -> None:
    """
    Credit enough input for at least ``nbytes`` * 0.8 output bytes.
    """
    pool.add(os.urandom(nbytes), 8.0)


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def summary(path: Path) -> list[tuple[str, int, str]]:
    """
    (action, credit, reason) of every recorded call.
    """
    return [(r["action"], r["credit"], r["reason"]) for r in records(path)]


class CountingKernel(RecordingKernel):
    """
    The recording kernel, counting how often the sink looks at it.
    """

    looks = 0

    def state(self) -> KernelState:
        self.looks += 1
        return super().state()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def pool() -> AsyncIterator[EntropyPool]:
    pool = EntropyPool(4096)
    yield pool
    pool.close()


def make_sink(
    tmp_path: Path,
    pool: EntropyPool,
    clock: FakeClock,
    semantics: Semantics = Semantics.NEW,
    uevents: socket.socket | None = None,
    **settings: Any,
) -> tuple[KernelSink, CountingKernel, Path]:
    record = tmp_path / "kernel.jsonl"
    kernel = CountingKernel(record, semantics, clock)
    config = KernelSinkConfig.model_validate(
        {"kind": "kernel", "uevents": uevents is not None, **settings}
    )
    broker = cast(BrokerView, FakeBroker(pool, tmp_path))
    sink = KernelSink(config, broker, clock=clock, kernel=kernel, uevents=uevents)
    return sink, kernel, record


async def test_new_kernel_gets_credited_seed_then_uncredited_reseeds(
    tmp_path: Path, pool: EntropyPool, clock: FakeClock
) -> None:
    """
    A freshly booted new kernel gets one credited seed (256 bits) at once;
    after it is ready, only uncredited writes with a reseed, every 60 s.
    """
    fill(pool)
    sink, _, record = make_sink(tmp_path, pool, clock)
    await sink.start()
    await settle()
    assert [("add", 256, "seed")] == summary(record)
    assert records(record)[0]["ready"]
    await clock.advance(59.0)
    assert 1 == len(records(record))
    await clock.advance(1.0)
    await clock.advance(120.0)
    assert [
        ("add", 256, "seed"),
        ("add", 0, "periodic"),
        ("reseed", 0, "periodic"),
        ("add", 0, "periodic"),
        ("reseed", 0, "periodic"),
        ("add", 0, "periodic"),
        ("reseed", 0, "periodic"),
    ] == summary(record)
    times = [r["time"] - clock.time() for r in records(record) if r["action"] == "add"]
    assert [-180.0, -120.0, -60.0, 0.0] == times
    status = sink.status()
    assert (64 * 4, 4, (f"record:{record}",)) == (
        status.bytes_out,
        status.requests,
        status.addresses,
    )
    await sink.shutdown(0.0)


async def test_empty_pool_neither_blocks_start_nor_spins(
    tmp_path: Path, pool: EntropyPool, clock: FakeClock
) -> None:
    """
    With nothing in the pool (upstreams unreachable at boot) start returns at
    once, the sink looks at most about once per check_interval, says so once,
    and seeds the kernel as soon as the pool has bytes.
    """
    sink, kernel, record = make_sink(tmp_path, pool, clock)
    with structlog.testing.capture_logs() as logs:
        await sink.start()
        await clock.advance(30.0)
        assert [] == records(record)
        assert kernel.looks <= 32
        fill(pool)
        await clock.advance(1.0)
    assert [("add", 256, "seed")] == summary(record)
    events = [entry["event"] for entry in logs]
    assert 1 == events.count("kernel_sink_pool_empty")
    assert 1 == events.count("kernel_sink_pool_refilled")
    assert 1 == events.count("crng_ready")
    await sink.shutdown(0.0)


async def test_vmgenid_uevent_reseeds_at_once(
    tmp_path: Path, pool: EntropyPool, clock: FakeClock
) -> None:
    """
    A NEW_VMGENID uevent (snapshot restore, clone) makes an uncredited write
    and a reseed without waiting for the timer; other uevents do nothing.
    """
    fill(pool)
    listener, kernel_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.setblocking(False)
    sink, _, record = make_sink(tmp_path, pool, clock, uevents=listener)
    await sink.start()
    await clock.advance(10.0)
    assert [("add", 256, "seed")] == summary(record)
    kernel_side.send(USB_ADD_UEVENT)
    await settle()
    assert 1 == len(records(record))
    with structlog.testing.capture_logs() as logs:
        kernel_side.send(VMGENID_UEVENT)
        await settle()
    assert [("add", 0, "vmgenid"), ("reseed", 0, "vmgenid")] == summary(record)[1:]
    assert "vm_generation_changed" in [entry["event"] for entry in logs]
    # The next periodic reseed is a full interval after the clone's.
    await clock.advance(59.0)
    assert 3 == len(records(record))
    await clock.advance(1.0)
    assert ("add", 0, "periodic") == summary(record)[3]
    await sink.shutdown(0.0)
    kernel_side.close()


async def test_new_kernel_already_ready_is_reseeded_at_start(
    tmp_path: Path, pool: EntropyPool, clock: FakeClock
) -> None:
    """
    A kernel ready before the agent runs gets no credit, only fresh input
    and a reseed at start.
    """
    fill(pool)
    sink, kernel, record = make_sink(tmp_path, pool, clock)
    kernel.add(b"\0" * 32, 256, "bootloader")  # the boot loader's seed
    await sink.start()
    await settle()
    assert [("add", 0, "start"), ("reseed", 0, "start")] == summary(record)[1:]
    await sink.shutdown(0.0)


async def test_classic_kernel_is_topped_up_whenever_it_falls_below_the_watermark(
    tmp_path: Path, pool: EntropyPool, clock: FakeClock
) -> None:
    """
    Classic semantics: from empty to the 3072-bit target at start, nothing
    while above 1024 bits, and a new top-up within check_interval once
    readers drain the count below the watermark.
    """
    fill(pool, 16384)
    sink, kernel, record = make_sink(tmp_path, pool, clock, Semantics.CLASSIC)
    await sink.start()
    await clock.advance(0.5)
    first = len(records(record))
    assert kernel.state().entropy >= 3072
    assert {("add", 256, "top_up")} == set(summary(record))
    kernel.drain(1500)
    await clock.advance(5.0)
    assert len(records(record)) == first
    kernel.drain(1000)
    await clock.advance(1.0)
    assert len(records(record)) > first
    assert kernel.state().entropy >= 3072
    await sink.shutdown(0.0)


async def test_credit_setting_is_what_the_kernel_is_credited(
    tmp_path: Path, pool: EntropyPool, clock: FakeClock
) -> None:
    """
    ``credit = 2`` makes the seed 128 bytes (still 256 bits); ``credit = 8``
    with 32-byte seeds credits 8 bits per byte, the most there is.
    """
    fill(pool)
    sink, _, record = make_sink(tmp_path, pool, clock, credit=2, seed_bytes=128)
    await sink.start()
    await settle()
    assert [(128, 256)] == [(r["bytes"], r["credit"]) for r in records(record)]
    await sink.shutdown(0.0)


async def test_uevent_socket_unavailable_is_said_once_and_timer_goes_on(
    tmp_path: Path,
    pool: EntropyPool,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    Without netlink (a sandbox forbidding AF_NETLINK) the sink says so once
    at info and keeps its timer.
    """

    def refuse() -> socket.socket:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(sink_module, "open_uevent_socket", refuse)
    fill(pool)
    record = tmp_path / "kernel.jsonl"
    config = KernelSinkConfig(kind="kernel", record=record)
    sink = KernelSink(config, cast(BrokerView, FakeBroker(pool, tmp_path)), clock=clock)
    with structlog.testing.capture_logs() as logs:
        await sink.start()
        await clock.advance(61.0)
    unavailable = [e for e in logs if e["event"] == "vmgenid_events_unavailable"]
    assert [("info", "Operation not permitted")] == [
        (e["log_level"], e["error"]) for e in unavailable
    ]
    assert ["seed", "periodic", "periodic"] == [r["reason"] for r in records(record)]
    await sink.shutdown(0.0)


async def test_record_path_is_relative_to_the_state_dir(
    tmp_path: Path, pool: EntropyPool, clock: FakeClock
) -> None:
    """
    ``record = "kernel.jsonl"`` is written in the broker's state directory,
    with a warning that the real kernel is not fed.
    """
    config = KernelSinkConfig(
        kind="kernel", record=Path("kernel.jsonl"), semantics="classic", uevents=False
    )
    sink = KernelSink(config, cast(BrokerView, FakeBroker(pool, tmp_path)), clock=clock)
    with structlog.testing.capture_logs() as logs:
        await sink.start()
    assert "kernel_sink_recording" in [e["event"] for e in logs]
    assert (f"record:{tmp_path / 'kernel.jsonl'}",) == sink.status().addresses
    await sink.shutdown(0.0)


async def test_unreadable_poolsize_stops_the_start(
    tmp_path: Path,
    pool: EntropyPool,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    With ``semantics = "auto"`` and no readable poolsize, start fails with
    a BrokerError naming the fix.
    """
    absent = tmp_path / "absent"
    monkeypatch.setattr(
        sink_module, "detect_semantics", lambda: detect_semantics(absent)
    )
    config = KernelSinkConfig(kind="kernel", record=tmp_path / "k.jsonl")
    sink = KernelSink(config, cast(BrokerView, FakeBroker(pool, tmp_path)), clock=clock)
    with pytest.raises(BrokerError, match='semantics = "classic" or "new"'):
        await sink.start()


class PollableKernel(CountingKernel):
    """
    A classic kernel whose POLLOUT never clears: a socket that is always
    writable, as /dev/random is while the count is below the kernel's own
    write_wakeup_threshold.
    """

    def __init__(self, path: Path, clock: FakeClock, fd: int) -> None:
        super().__init__(path, Semantics.CLASSIC, clock)
        self._pollable = fd

    def pollable_fd(self) -> int | None:
        return self._pollable


async def test_classic_pollout_that_stays_raised_does_not_spin(
    tmp_path: Path, pool: EntropyPool, clock: FakeClock
) -> None:
    """
    A classic kernel above our watermark but below its own wake-up threshold
    keeps POLLOUT raised: the sink looks once per wake-up and then only on its
    timer, a bounded number of looks however long the loop runs.
    """
    fill(pool)
    writable, other = socket.socketpair()
    kernel = PollableKernel(tmp_path / "kernel.jsonl", clock, writable.fileno())
    kernel.add(b"\0" * 512, 4096, "earlier")  # above the 1024-bit watermark
    config = KernelSinkConfig(kind="kernel", uevents=False)
    sink = KernelSink(
        config,
        cast(BrokerView, FakeBroker(pool, tmp_path)),
        clock=clock,
        kernel=kernel,
    )
    await sink.start()
    for _ in range(20):
        await settle()
    assert kernel.looks <= 3
    await clock.advance(10.0)
    for _ in range(20):
        await settle()
    assert kernel.looks <= 2 * 10 + 3
    assert 1 == len(records(tmp_path / "kernel.jsonl"))  # nothing written
    await sink.shutdown(0.0)
    writable.close()
    other.close()


class BrokenKernel(CountingKernel):
    """
    Answers the look at start, then fails with a bug (not an OSError).
    """

    def state(self) -> KernelState:
        state = super().state()
        if self.looks > 1:
            raise RuntimeError("driver bug")
        return state


async def test_feeding_that_ends_by_a_bug_is_logged_as_an_error(
    tmp_path: Path, pool: EntropyPool, clock: FakeClock
) -> None:
    """
    The feeding task never ends by itself; if a bug ends it, the operator
    hears of it at error level.
    """
    kernel = BrokenKernel(tmp_path / "kernel.jsonl", Semantics.NEW, clock)
    config = KernelSinkConfig(kind="kernel", uevents=False)
    sink = KernelSink(
        config, cast(BrokerView, FakeBroker(pool, tmp_path)), clock=clock, kernel=kernel
    )
    with structlog.testing.capture_logs() as logs:
        await sink.start()
        await settle()
    stopped = [e for e in logs if e["event"] == "kernel_sink_stopped_feeding"]
    assert ["error"] == [e["log_level"] for e in stopped]
    assert "driver bug" in stopped[0]["error"]
    await sink.shutdown(0.0)


class RefusingKernel(CountingKernel):
    """
    Refuses every RNDADDENTROPY while ``refusing`` is set.
    """

    refusing = True

    def add(self, data: bytes, credit: int, reason: str) -> None:
        if self.refusing:
            raise PermissionError(1, "Operation not permitted")
        super().add(data, credit, reason)


async def test_kernel_refusing_writes_is_said_once_and_retried(
    tmp_path: Path, pool: EntropyPool, clock: FakeClock
) -> None:
    """
    A kernel that refuses writes (a capability dropped under the broker) is
    warned about once, retried once per check_interval, and the recovery is
    said once too.
    """
    fill(pool)
    kernel = RefusingKernel(tmp_path / "kernel.jsonl", Semantics.NEW, clock)
    config = KernelSinkConfig(kind="kernel", uevents=False)
    sink = KernelSink(
        config, cast(BrokerView, FakeBroker(pool, tmp_path)), clock=clock, kernel=kernel
    )
    with structlog.testing.capture_logs() as logs:
        await sink.start()
        await clock.advance(10.0)
        # A try per check_interval: the look before it, the look before a
        # credited write, and the look after it.
        assert kernel.looks <= 3 * 10 + 4
        kernel.refusing = False
        await clock.advance(1.0)
    events = [entry["event"] for entry in logs]
    assert 1 == events.count("kernel_write_failed")
    assert 1 == events.count("kernel_write_recovered")
    assert [("add", 256, "seed")] == summary(tmp_path / "kernel.jsonl")
    assert 1 == sink.status().requests
    await sink.shutdown(0.0)


async def test_seed_whose_bytes_come_after_the_kernel_got_ready_is_uncredited(
    tmp_path: Path, pool: EntropyPool, clock: FakeClock
) -> None:
    """
    The sink waits for the pool with a seed in mind; the kernel becomes
    ready by other means meanwhile (virtio-rng, RDSEED): the bytes go in
    uncredited, with a reseed.
    """
    sink, kernel, record = make_sink(tmp_path, pool, clock)
    await sink.start()
    await settle()
    kernel.add(b"\0" * 32, 256, "virtio-rng")  # ready without us
    fill(pool)
    await settle()
    assert [("add", 0, "start"), ("reseed", 0, "start")] == summary(record)[1:]
    await sink.shutdown(0.0)
