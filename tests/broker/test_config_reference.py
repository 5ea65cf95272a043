"""
The configuration reference documents every key the models accept.
"""

from pathlib import Path

import pytest
from pydantic import BaseModel

from broker.accounts import AccountsConfig, CustomerConfig
from broker.config import BrokerSection, LoggingSection
from broker.health_config import HealthConfig
from sinks.egd.config import EgdSinkConfig
from sinks.http.config import HttpSinkConfig
from sinks.kernel.config import KernelSinkConfig
from sources.device import DeviceSourceConfig
from sources.egd import EgdSourceConfig
from sources.entropykey.config import EntropyKeySourceConfig
from sources.getrandom import GetrandomSourceConfig
from sources.http import HttpSourceConfig

REFERENCE = (Path(__file__).parents[2] / "config" / "README.md").read_text()

MODELS: list[type[BaseModel]] = [
    BrokerSection,
    LoggingSection,
    GetrandomSourceConfig,
    DeviceSourceConfig,
    EntropyKeySourceConfig,
    HealthConfig,
    EgdSinkConfig,
    AccountsConfig,
    CustomerConfig,
    HttpSinkConfig,
    EgdSourceConfig,
    HttpSourceConfig,
    KernelSinkConfig,
]


@pytest.mark.parametrize("model", MODELS, ids=lambda model: model.__name__)
def test_every_key_is_documented(model: type[BaseModel]) -> None:
    """
    An operator finds every accepted key in config/README.md.
    """
    missing = [name for name in model.model_fields if f"`{name}`" not in REFERENCE]
    assert [] == missing
