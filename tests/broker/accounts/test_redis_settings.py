"""
The ``[accounts]`` Redis settings: sentinels instead of a host, passwords only
from a file or an environment variable (and never echoed), replica waits
shorter than the Redis timeout; each mistake named by its key path.
"""

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from broker.accounts import RedisBackend
from broker.accounts.config import AccountsConfig
from broker.accounts.redis_link import RedisLink, target_from_config
from broker.config import parse_config
from broker.errors import ConfigError
from tests.helpers import free_port

REFERENCE = Path(__file__).parents[3] / "config" / "README.md"
SENTINELS = ["10.0.0.5:26379", "10.0.0.6:26379", "[fd00::7]:26379"]
SECRET = "correct-horse-battery-staple"  # noqa: S105 - a made-up password to look for


def load(**accounts: Any) -> AccountsConfig:
    """
    Validate a whole file holding this ``[accounts]`` table.
    """
    data = {
        "sources": [{"name": "rng", "kind": "getrandom"}],
        "sinks": [{"kind": "egd", "listen": ["tcp://127.0.0.1:8888"]}],
        "accounts": {"backend": "redis", **accounts},
    }
    return parse_config(data).accounts


def sentinel(**extra: Any) -> dict[str, Any]:
    return {
        "redis_sentinels": SENTINELS,
        "redis_sentinel_service": "ebroker",
        **extra,
    }


def test_documented_sentinel_example_loads() -> None:
    """
    The ``[accounts]`` example in config/README.md validates as written.
    """
    blocks = re.findall(r"```toml\n(.*?)```", REFERENCE.read_text(), re.DOTALL)
    examples = [block for block in blocks if "redis_sentinels" in block]
    assert 1 == len(examples)
    config = load(**tomllib.loads(examples[0])["accounts"])
    assert "ebroker" == config.redis_sentinel_service
    assert 1 == config.redis_min_replicas


def test_sentinels_with_the_default_or_a_hostless_url_load() -> None:
    """
    With sentinels, redis_url may be left alone or give only scheme and
    database.
    """
    assert SENTINELS == load(**sentinel()).redis_sentinels
    assert "rediss:///2" == load(**sentinel(redis_url="rediss:///2")).redis_url
    default = "redis://127.0.0.1:6379/0"
    assert default == load(**sentinel(redis_url=default)).redis_url


@pytest.mark.parametrize(
    ("accounts", "expected"),
    [
        (
            sentinel(redis_url="redis://10.0.0.9:6379/0"),
            "accounts.redis_url: names a host, but with redis_sentinels",
        ),
        (
            sentinel(redis_url="redis://127.0.0.1:6380/0"),
            "accounts.redis_url: names a host",
        ),
        (
            sentinel(redis_url="unix:///run/redis.sock"),
            "accounts.redis_url: a unix socket cannot be used with redis_sentinels",
        ),
        (
            {"redis_sentinels": SENTINELS},
            "accounts.redis_sentinel_service: required with redis_sentinels",
        ),
        (
            {"redis_sentinel_service": "ebroker"},
            "accounts.redis_sentinel_service: needs redis_sentinels",
        ),
        (
            {"redis_sentinel_auth": True, "redis_password_env": "PW"},
            "accounts.redis_sentinel_auth: needs redis_sentinels",
        ),
        (
            sentinel(redis_sentinel_auth=True),
            "accounts.redis_sentinel_auth: needs redis_password_file or "
            "redis_password_env",
        ),
        (
            sentinel(redis_sentinels=["10.0.0.5"]),
            "accounts.redis_sentinels[0]: '10.0.0.5' is not HOST:PORT",
        ),
        (
            sentinel(redis_sentinels=["10.0.0.5:0"]),
            "accounts.redis_sentinels[0]: '10.0.0.5:0' is not HOST:PORT",
        ),
        (
            sentinel(redis_sentinels=["10.0.0.5:1", "a:70000"]),
            "accounts.redis_sentinels[1]: 'a:70000' is not HOST:PORT",
        ),
        (
            sentinel(redis_sentinels=["10.0.0.5:1", "10.0.0.5:1"]),
            "accounts.redis_sentinels: '10.0.0.5:1' is listed twice",
        ),
        (
            {"redis_password_file": "/etc/pw", "redis_password_env": "PW"},
            "accounts.redis_password_env: give the password in "
            "redis_password_file or redis_password_env, not both",
        ),
        (
            {"redis_min_replicas": 1, "redis_replica_timeout": "0.5 s"},
            "accounts.redis_replica_timeout: must be shorter than redis_timeout",
        ),
        (
            {"redis_min_replicas": -1},
            "accounts.redis_min_replicas: Input should be greater than or equal to 0",
        ),
    ],
)
def test_bad_redis_settings_name_the_key_path(
    accounts: dict[str, Any], expected: str
) -> None:
    """
    Each mistake is refused at load with its key path and a plain reason.
    """
    with pytest.raises(ConfigError) as caught:
        load(**accounts)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("accounts", "key"),
    [
        (sentinel(redis_url=f"redis://:{SECRET}@127.0.0.1:6379/0"), "redis_url"),
        (
            {
                "redis_url": f"redis://:{SECRET}@10.0.0.9:6379/0",
                "redis_password_env": "PW",
            },
            "redis_url",
        ),
        ({"redis_password_env": SECRET}, "redis_password_env"),
    ],
)
def test_a_password_in_the_config_is_refused_without_echoing_it(
    accounts: dict[str, Any], key: str
) -> None:
    """
    A password where it does not belong is refused, and the message never
    repeats it.
    """
    with pytest.raises(ConfigError) as caught:
        load(**accounts)
    assert f"accounts.{key}:" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_password_comes_from_a_file_without_its_newline(tmp_path: Path) -> None:
    """
    The password file is read at start, its trailing newline dropped; the
    target's repr never shows it.
    """
    secret = tmp_path / "redis-password"
    secret.write_text(SECRET + "\n")
    target = target_from_config(load(**sentinel(redis_password_file=str(secret))))
    assert SECRET == target.password
    assert target.sentinel_password is None
    assert SECRET not in repr(target)


def test_password_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    redis_password_env names the variable; with redis_sentinel_auth the
    sentinels get the same password.
    """
    monkeypatch.setenv("EBROKER_REDIS_PASSWORD", SECRET)
    config = load(
        **sentinel(
            redis_password_env="EBROKER_REDIS_PASSWORD",  # noqa: S106 - a variable's name
            redis_sentinel_auth=True,
        )
    )
    target = target_from_config(config)
    assert (SECRET, SECRET) == (target.password, target.sentinel_password)


def test_unreadable_password_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A missing or empty password file, or an unset variable, stops start-up
    with the key path.
    """
    missing = tmp_path / "absent"
    with pytest.raises(ConfigError, match=r"accounts\.redis_password_file: cannot"):
        target_from_config(load(redis_password_file=str(missing)))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=r"accounts\.redis_password_file: .* empty"):
        target_from_config(load(redis_password_file=str(empty)))
    monkeypatch.delenv("EBROKER_UNSET_PASSWORD", raising=False)
    unset = load(redis_password_env="EBROKER_UNSET_PASSWORD")  # noqa: S106 - a name
    with pytest.raises(ConfigError, match=r"accounts\.redis_password_env: "):
        target_from_config(unset)


async def test_sentinel_link_uses_the_url_database_and_hides_the_password(
    tmp_path: Path,
) -> None:
    """
    With sentinels the link takes scheme and database from redis_url, sends
    the password to the data nodes, and its status names no password.
    """
    secret = tmp_path / "redis-password"
    secret.write_text(SECRET)
    config = load(**sentinel(redis_url="redis:///3", redis_password_file=str(secret)))
    link = RedisLink(target_from_config(config), timeout=0.5)
    try:
        kwargs = link.client.connection_pool.connection_kwargs
        assert (3, SECRET) == (kwargs["db"], kwargs["password"])
        status = link.describe()
        assert {"mode": "sentinel", "service": "ebroker", "sentinels": 3} == {
            key: status[key] for key in ("mode", "service", "sentinels")
        }
        assert SECRET not in repr(status)
    finally:
        await link.close()


async def test_single_server_link_takes_the_password_from_the_file(
    tmp_path: Path,
) -> None:
    """
    Without sentinels the password file still feeds the connection, and the
    URL carries none.
    """
    secret = tmp_path / "redis-password"
    secret.write_text(SECRET)
    config = load(redis_url="redis://10.0.0.9:6379/1", redis_password_file=str(secret))
    link = RedisLink(target_from_config(config), timeout=0.5)
    try:
        kwargs = link.client.connection_pool.connection_kwargs
        assert ("10.0.0.9", 1, SECRET) == (
            kwargs["host"],
            kwargs["db"],
            kwargs["password"],
        )
        assert {"mode": "single"} == link.describe()
    finally:
        await link.close()


async def test_unreachable_sentinels_never_echo_the_password(tmp_path: Path) -> None:
    """
    When no sentinel answers, the backend goes unhealthy with an error that
    names the sentinels but never the password, in status and in the log.
    """
    secret = tmp_path / "redis-password"
    secret.write_text(SECRET)
    config = load(
        **sentinel(
            redis_sentinels=[f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"],
            redis_password_file=str(secret),
            redis_sentinel_auth=True,
        )
    )
    backend = RedisBackend.from_config(config)
    with capture_logs() as logs:
        try:
            await backend.start(0.0)
            status = backend.status()
        finally:
            await backend.close()
    assert not status["healthy"]
    assert "MasterNotFoundError" in str(status["last_error"])
    assert ["redis_unavailable"] == [entry["event"] for entry in logs]
    assert SECRET not in repr(status)
    assert SECRET not in repr(logs)
