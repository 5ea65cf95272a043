"""
The HTTP sink's config checks for the pollen endpoint: a path of its own and a
body limit pollinate's POST fits in.
"""

from typing import Any

import pytest

from broker.config import parse_config
from broker.errors import ConfigError
from sinks.http.app import create_app
from sinks.http.config import POLLEN_BODY_BYTES, HttpSinkConfig, path_taken
from tests.sinks.http.test_api import FakeBroker


def with_sink(**sink: Any) -> dict[str, Any]:
    return {
        "sources": [{"name": "rng", "kind": "getrandom"}],
        "sinks": [{"kind": "http", "listen": ["tcp://127.0.0.1:0"], **sink}],
    }


def test_pollinate_body_size() -> None:
    """
    pollinate POSTs ``challenge=`` and the 128 hex digits of a SHA-512.
    """
    assert 138 == POLLEN_BODY_BYTES


@pytest.mark.parametrize(
    "path",
    [
        "/healthz",
        "/readyz",
        "/v1/entropy",
        "/v1/status",
        "/v1/history",
        "/metrics",
        "/v1/admin/reload",
        "/v1/admin/other",
        "/v1/simulator/k",
    ],
)
def test_pollen_on_an_api_path_is_refused(path: str) -> None:
    """
    With pollen on, a path the API serves is refused at the key, saying why.
    """
    with pytest.raises(ConfigError) as caught:
        parse_config(with_sink(pollen=True, pollen_path=path))
    assert f"sinks[0].pollen_path: {path} is taken by another endpoint" in str(
        caught.value
    )
    assert path_taken(path)


@pytest.mark.parametrize("path", ["/", "/pollen", "/v1/entropyx", "/v1/admin"])
def test_pollen_on_a_free_path_is_accepted(path: str) -> None:
    """
    ``/`` (shared with the status page) and paths no route uses are fine.
    """
    config = parse_config(with_sink(pollen=True, pollen_path=path))
    sink = config.sinks[0]
    assert isinstance(sink, HttpSinkConfig)
    assert path == sink.pollen_path
    assert not path_taken(path)


def test_api_path_without_pollen_is_not_checked() -> None:
    """
    ``pollen_path`` means nothing while pollen is off.
    """
    parse_config(with_sink(pollen_path="/healthz", max_body_bytes=0))


def test_body_limit_below_pollinate_post_is_refused() -> None:
    """
    A ``max_body_bytes`` that would answer every pollinate POST 413 is refused.
    """
    with pytest.raises(ConfigError) as caught:
        parse_config(with_sink(pollen=True, max_body_bytes=POLLEN_BODY_BYTES - 1))
    message = str(caught.value)
    assert "sinks[0].max_body_bytes: pollinate POSTs 138 bytes" in message
    assert "at least 138" in message


def test_body_limit_of_exactly_pollinate_post_is_accepted() -> None:
    """
    138 bytes is enough.
    """
    parse_config(with_sink(pollen=True, max_body_bytes=POLLEN_BODY_BYTES))


def test_both_pollen_problems_are_reported_at_once() -> None:
    """
    A taken path and a small body limit are both named in one go.
    """
    with pytest.raises(ConfigError) as caught:
        parse_config(with_sink(pollen=True, pollen_path="/metrics", max_body_bytes=0))
    message = str(caught.value)
    assert "sinks[0].pollen_path: /metrics is taken" in message
    assert "sinks[0].max_body_bytes: pollinate POSTs" in message


def test_app_refuses_a_taken_path_it_is_given_unchecked() -> None:
    """
    The application checks the same paths at start, for a config that
    skipped validation.
    """
    unchecked = HttpSinkConfig.model_construct(
        **with_sink(pollen=True, pollen_path="/v1/status")["sinks"][0]
    )
    with pytest.raises(ConfigError, match="pollen_path '/v1/status' is taken"):
        create_app(unchecked, FakeBroker())
