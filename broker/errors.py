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
