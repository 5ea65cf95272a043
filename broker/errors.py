"""
Exceptions raised by the broker core.
"""


class BrokerError(Exception):
    """
    Root of every error the broker raises on purpose.
    """


class ConfigError(BrokerError):
    """
    A configuration file is missing, unreadable or invalid.

    The message is meant for operators: one line per problem, each starting with
    the key path that caused it.
    """


class SourceError(BrokerError):
    """
    A source could not deliver data (device error, EOF, stall).
    """


class PoolClosedError(BrokerError):
    """
    The pool was closed while a withdrawal was waiting.
    """


class SourceQuarantined(SourceError):
    """
    A source delivers data that must not be credited (a latched device failure,
    failed health tests); the supervisor keeps it out of the pool.
    """


class SourceStalled(SourceError):
    """
    A source stopped delivering for longer than it should.
    """
