"""
A simulated Entropy Key, for tests, demos and ``transport = "simulated"``.

``model``
    `DeviceModel`: the key itself, sans-I/O (host bytes and the time in,
    frames out), with fault injection.
``key``
    `SimulatedKey`: a model running in real (or injected) time behind a lock,
    for threads; `aread` / `awrite` for asyncio.
``usb_bus``
    `SimulatedBus`: a pyusb backend presenting simulated keys as USB devices.
``unix_server``
    `UnixKeyServer` / `serve_unix`: a key behind an ekey-ulusbd-style socket.
``keypairs``
    Serials, long-term keys and keyring files for simulated keys.
"""
