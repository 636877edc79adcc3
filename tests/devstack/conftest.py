"""Fixtures of the dev-stack tests."""

from __future__ import annotations

import pytest

from services.devstack.broker import BrokerProcess


@pytest.fixture(params=["noida", "tansu"])
def any_broker(request: pytest.FixtureRequest) -> BrokerProcess:
    """The session noida broker, then the session Tansu broker: tests run once on each."""
    name = "kafka_broker" if request.param == "noida" else "tansu_broker"
    if request.param == "noida" and request.getfixturevalue("broker_impl").value != "noida":
        pytest.skip("kafka_broker is not noida in this run ($SPR_TEST_BROKER)")
    broker: BrokerProcess = request.getfixturevalue(name)
    return broker
