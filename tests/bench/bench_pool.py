"""
Pool conditioning throughput against bare SHA-512 hashing of the same input.
"""

import hashlib
import os
import time

from broker.pool import EntropyPool


def _bare_sha512(seconds: float, block: bytes) -> float:
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(64):
            hashlib.sha512(block).digest()
        done += 64 * len(block)
    return done / (time.perf_counter() - start)


def _pool(seconds: float, data: bytes) -> float:
    pool = EntropyPool(1 << 20)
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        pool.add(data, 8)
        done += len(pool.read_nowait(1 << 20))
    return done / (time.perf_counter() - start)


def run(seconds: float) -> list[str]:
    data = os.urandom(4096)
    baseline = _bare_sha512(seconds, data[:40])
    measured = _pool(seconds, data)
    return [
        "| measurement | MB/s | ratio |",
        "|---|---|---|",
        "| baseline: SHA-512 over 40-byte inputs (bytes hashed) "
        f"| {baseline / 1e6:.1f} | 1.00 |",
        "| pool: add 4 KiB at 8 bits/byte + withdraw (bytes out) "
        f"| {measured / 1e6:.1f} | {measured / baseline:.2f} |",
    ]
