"""
What the upstream sources (``egd`` and ``http``) share: their common keys
(`config`), the bookkeeping of their endpoints (`endpoints`, no I/O), the
moves between endpoints (`failover`), and the driver life built on them
(`driver`).
"""
