"""
ebroker: a high-availability entropy broker.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ebroker")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
