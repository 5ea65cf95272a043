"""
Entropy Key driver CPU cost per key at full rate, host side only.

A `DeviceModel` and a `Session` are paired in memory on a simulated clock (as in
``tests/sources/entropykey/test_session.py``) to record the exact byte stream a
key sends, cut into USB-sized reads. That recording is then replayed into fresh
`Session` objects with the same nonce generator, so the device model's own
cost is excluded: what is timed is ``Session.receive_data`` plus draining its
events, i.e. framing, MAC checks and decryption, as the driver does them.

CPU time is `time.process_time`, and the figure that matters is CPU seconds per
second of key output: the fraction of one core one key costs.
"""

import hashlib
import os
import random
from dataclasses import dataclass

from sources.entropykey.session import Anomaly, EntropyBlock, Session
from sources.entropykey.sim.model import BLOCKS_PER_FIPS, DeviceModel
from sources.entropykey.skein import skein256

from .common import cpu_rate, ratio

KEY_RATE = 4096
"""Bytes of entropy per second a key delivers at full rate (4 KiB/s)."""
KEY_SECONDS = 40.0
"""Key output recorded; past 32 s at 4 KiB/s, so it includes one re-key."""
USB_READ = 1024
"""One USB read, as in ``sources/entropykey/transport.py``."""
TICK = 0.05
"""Simulated clock step while recording."""

_SERIAL = bytes.fromhex("37006F065837393049391143")
_LTK = bytes(range(32))
_NONCE_SEED = 8


@dataclass(frozen=True, slots=True)
class Recording:
    """
    What a key sent, as ``(time, bytes)`` reads, and the entropy it carried.
    """

    reads: tuple[tuple[float, bytes], ...]
    entropy: int
    wire_bytes: int


def _new_session() -> Session:
    return Session({_SERIAL: _LTK}, random_bytes=random.Random(_NONCE_SEED).randbytes)


def record(key_seconds: float = KEY_SECONDS) -> Recording:
    """
    Run a device model against a session and keep everything the device sent.
    """
    rng = random.Random(7)
    device = DeviceModel(
        _SERIAL,
        _LTK,
        random_bytes=rng.randbytes,
        block_interval=BLOCKS_PER_FIPS * 32 / KEY_RATE,
    )
    session = _new_session()
    device.data_to_send()  # the power-on S! frame: the host resets first anyway
    session.start(0.0)
    reads: list[tuple[float, bytes]] = []
    entropy = 0
    now = 0.0
    while entropy < key_seconds * KEY_RATE:
        device.receive_data(session.data_to_send())
        device.advance(now)
        data = device.data_to_send()
        for i in range(0, len(data), USB_READ):
            chunk = data[i : i + USB_READ]
            reads.append((now, chunk))
            session.receive_data(chunk, now)
        for event in session.events():
            if isinstance(event, EntropyBlock):
                entropy += len(event.data)
        now += TICK
    return Recording(tuple(reads), entropy, sum(len(r) for _, r in reads))


def replay(recording: Recording) -> int:
    """
    Feed a recording to a fresh session as the driver would; return entropy bytes.

    Raises:
        RuntimeError: the session did not deliver exactly the recorded entropy.
    """
    session = _new_session()
    session.start(0.0)
    session.data_to_send()
    entropy = bytearray()
    anomalies = 0
    for now, data in recording.reads:
        session.receive_data(data, now)
        session.data_to_send()
        for event in session.events():
            match event:
                case EntropyBlock(data=block, creditable=True):
                    entropy += block
                case Anomaly():
                    anomalies += 1
    # One reset anomaly is the connection opening; anything else is a bug.
    if len(entropy) != recording.entropy or anomalies != 1:
        raise RuntimeError(
            f"replay delivered {len(entropy)} of {recording.entropy} bytes "
            f"with {anomalies} anomalies"
        )
    return len(entropy)


def _host_cpu(recording: Recording, seconds: float) -> float:
    """
    CPU seconds per byte of entropy delivered by the host side.
    """
    return 1.0 / cpu_rate(seconds, lambda: replay(recording))


def _sha256_cpu(recording: Recording, seconds: float) -> float:
    """
    CPU seconds per byte of entropy for SHA-256 over the same reads.
    """

    def once() -> int:
        for _, data in recording.reads:
            hashlib.sha256(data).digest()
        return recording.entropy

    return 1.0 / cpu_rate(seconds, once)


def _primitive_rates(seconds: float) -> tuple[float, float]:
    message = os.urandom(4096)

    def skein() -> int:
        skein256(message)
        return len(message)

    def sha() -> int:
        for _ in range(256):
            hashlib.sha256(message).digest()
        return 256 * len(message)

    return cpu_rate(seconds, skein), cpu_rate(seconds, sha)


def run(seconds: float) -> list[str]:
    recording = record()
    baseline = _sha256_cpu(recording, seconds)
    host = _host_cpu(recording, seconds)
    skein_rate, sha_rate = _primitive_rates(seconds / 2)
    frames = recording.wire_bytes // 64
    per_key = host * KEY_RATE
    return [
        f"Recorded {recording.entropy / KEY_RATE:.0f} s of a {KEY_RATE} B/s key: "
        f"{frames} frames, {len(recording.reads)} reads of <= {USB_READ} bytes, "
        "one re-key.",
        "",
        "| measurement | CPU s per key-second (= fraction of one core) "
        "| CPU µs per E! frame (amortised) | cost ratio (x baseline CPU) |",
        "|---|---|---|---|",
        "| baseline: hashlib.sha256 over the same reads "
        f"| {baseline * KEY_RATE:.2e} | {baseline * 32 * 1e6:.2f} | 1 |",
        "| entropykey host side: Session.receive_data + events (MAC + decrypt) "
        f"| {per_key:.2e} | {host * 32 * 1e6:.0f} | {ratio(host, baseline)} |",
        "",
        f"Keys per core at {KEY_RATE} B/s: {1 / per_key:.0f} "
        f"(requirement: one key < 10 % of a core: "
        f"{'met' if per_key < 0.10 else 'NOT met'}).",
        "",
        "| primitive (4 KiB messages) | MB/s (CPU) | speed ratio |",
        "|---|---|---|",
        f"| baseline: hashlib.sha256 | {sha_rate / 1e6:.1f} | 1 |",
        f"| Skein-256 (sources/entropykey/skein.py) | {skein_rate / 1e6:.3f} "
        f"| {ratio(skein_rate, sha_rate)} |",
    ]
