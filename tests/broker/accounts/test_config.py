"""
Customer config: the documented TOML shape loads; ambiguity is refused with key
paths; tokens are only ever stored hashed.
"""

import tomllib
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from broker.accounts.config import AccountsConfig, CustomerConfig, validate_customers
from broker.accounts.identity import hash_token

EXAMPLE = f"""
[accounts]
backend = "memory"
redis_url = "redis://127.0.0.1:6379/0"
on_redis_failure = "fail_open"

[[customers]]
id = "acme"
networks = ["127.0.0.2/32", "10.1.0.0/16"]
uids = [1001]
tokens = ["{hash_token("acme-token")}"]
weight = 3
client_rate = "512 B/s"
client_burst = "4 KiB"
rate = "2 KiB/s"
burst = "16 KiB"
quota = "200 MiB/day"

[[customers]]
id = "default"
deny = true
"""


def customers(*entries: dict[str, Any]) -> list[CustomerConfig]:
    """
    Validate a list of customer tables.
    """
    return [CustomerConfig.model_validate(entry) for entry in entries]


def test_documented_example_loads() -> None:
    """
    The shape in the docs validates, with units parsed.
    """
    data = tomllib.loads(EXAMPLE)
    settings = AccountsConfig.model_validate(data["accounts"])
    loaded = customers(*data["customers"])
    assert [] == validate_customers(loaded)
    assert "memory" == settings.backend
    acme = loaded[0]
    assert (512.0, 4096) == acme.client_bucket
    assert (2048.0, 16384) == acme.customer_bucket
    assert acme.quota is not None
    assert (200 * 1024**2, "day") == (acme.quota.bytes, acme.quota.period)
    assert loaded[1].deny


def test_default_bursts_are_one_second_of_rate() -> None:
    """
    Without a burst, a bucket holds one second of its rate.
    """
    (only,) = customers({"id": "a", "client_rate": "100 B/s", "rate": "1 KiB/s"})
    assert (100.0, 100) == only.client_bucket
    assert (1024.0, 1024) == only.customer_bucket


def test_same_network_twice_is_ambiguous() -> None:
    """
    The same network under two customers is refused with both key paths.
    """
    problems = validate_customers(
        customers(
            {"id": "a", "networks": ["10.0.0.0/8", "10.1.0.0/16"]},
            {"id": "b", "networks": ["192.0.2.0/24"]},
            {"id": "c", "networks": ["10.1.0.0/16"]},
        )
    )
    assert [
        "customers[2].networks[0]: 10.1.0.0/16 is also listed by "
        "customers[0].networks[1]"
    ] == problems


def test_overlapping_networks_are_fine() -> None:
    """
    Nested networks are not ambiguous: the most specific wins.
    """
    assert [] == validate_customers(
        customers(
            {"id": "a", "networks": ["10.0.0.0/8"]},
            {"id": "b", "networks": ["10.1.0.0/16"]},
        )
    )


def test_mapped_network_equals_ipv4_network() -> None:
    """
    ``::ffff:10.0.0.0/104`` and ``10.0.0.0/8`` are the same network.
    """
    problems = validate_customers(
        customers(
            {"id": "a", "networks": ["10.0.0.0/8"]},
            {"id": "b", "networks": ["::ffff:10.0.0.0/104"]},
        )
    )
    assert 1 == len(problems)
    assert problems[0].startswith("customers[1].networks[0]")


def test_same_uid_token_and_id_twice() -> None:
    """
    uids, token hashes and ids must each be unique; a token is not echoed back.
    """
    token = hash_token("t")
    problems = validate_customers(
        customers(
            {"id": "a", "uids": [5], "tokens": [token]},
            {"id": "a", "uids": [6, 5], "tokens": [token]},
        )
    )
    assert [
        "customers[1].id: 'a' is already used by customers[0]",
        "customers[1].uids[1]: uid 5 is also listed by customers[0].uids[0]",
        "customers[1].tokens[0]: this token is also listed by customers[0].tokens[0]",
    ] == problems
    assert not any(token in problem for problem in problems)


def test_burst_needs_rate() -> None:
    """
    A burst without its rate is a mistake worth reporting.
    """
    problems = validate_customers(
        customers({"id": "a", "burst": "1 KiB", "client_burst": "1 KiB"})
    )
    assert [
        "customers[0].client_burst: needs client_rate",
        "customers[0].burst: needs rate",
    ] == problems


def test_plain_token_is_refused() -> None:
    """
    A token written in clear is refused, and the message says how to store it.
    """
    with pytest.raises(ValidationError, match="stored hashed") as info:
        CustomerConfig.model_validate({"id": "a", "tokens": ["my-secret-token"]})
    assert ("tokens", 0) == info.value.errors()[0]["loc"]


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        ({"id": "a", "networks": ["10.1.2.3/16"]}, ("networks", 0)),
        ({"id": "a", "weight": 0}, ("weight",)),
        ({"id": "a", "quota": "1 GiB/year"}, ("quota",)),
        ({"id": "a", "uids": [-1]}, ("uids", 0)),
        ({"id": "a", "colour": "red"}, ("colour",)),
        ({"id": "bad id"}, ("id",)),
    ],
)
def test_bad_values_name_their_key(entry: dict[str, Any], where: tuple[Any]) -> None:
    """
    Each bad value is refused with its own key path.
    """
    with pytest.raises(ValidationError) as info:
        CustomerConfig.model_validate(entry)
    assert where == info.value.errors()[0]["loc"]


def test_bad_backend_settings() -> None:
    """
    Unknown backends, policies and keys are refused.
    """
    bad_settings: list[dict[str, Any]] = [
        {"backend": "etcd"},
        {"on_redis_failure": "retry"},
        {"redis_url": "http://x"},
        {"persist_interval": 0},
        {"customers": []},
    ]
    for bad in bad_settings:
        with pytest.raises(ValidationError):
            AccountsConfig.model_validate(bad)


@pytest.mark.parametrize("model", [CustomerConfig, AccountsConfig])
def test_every_field_is_described(model: type[BaseModel]) -> None:
    """
    Every config key has a description for the reference docs.
    """
    assert [] == [
        name for name, field in model.model_fields.items() if not field.description
    ]


def test_serialises_back_to_config_text() -> None:
    """
    Dumped config shows networks, rates and quotas as text, never objects.
    """
    (only,) = customers(
        {"id": "a", "networks": ["10.0.0.0/8"], "quota": "1 KiB/week", "rate": 10}
    )
    dumped = only.model_dump()
    assert ["10.0.0.0/8"] == dumped["networks"]
    assert "1024 B/week" == dumped["quota"]
