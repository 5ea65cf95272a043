"""
Serials, keys and a quiet simulated key shared by the simulator tests.
"""

from sources.entropykey.sim.key import KeyOptions, SimulatedKey

SERIAL = bytes.fromhex("37006F065837393049391143")
SERIAL_TEXT = "NwBvBlg3OTBJORFD"
LTK = bytes(range(32))
TICK = 0.05
SLOW = KeyOptions(rate=1e-3, info_interval=1e9)
"""A key that, once reset, says nothing until spoken to."""


def slow_key(serial: bytes = SERIAL) -> SimulatedKey:
    """
    A real-time key that has been reset and has no output pending.
    """
    key = SimulatedKey(serial, LTK, **SLOW)
    key.discard_pending()
    return key
