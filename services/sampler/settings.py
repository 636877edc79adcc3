"""Settings of the region sampler: env prefix ``SPR_SAMPLER_``, config table ``[sampler]``.

``spr-sampler --help-env`` lists every setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, FilePath
from pydantic_settings import SettingsConfigDict

from services.common.kafka_io import KafkaSettings
from services.common.settings import SprSettings
from services.common.topics import REGIONS
from services.core.ids import stable_id
from services.core.sampler import DEFAULT_K, SAMPLER_VERSION


class SamplerSettings(SprSettings):
    """Everything the region sampler reads at start."""

    model_config = SettingsConfigDict(env_prefix="SPR_SAMPLER_")

    bootstrap_servers: str = Field(default="127.0.0.1:9092", description="Kafka bootstrap servers.")
    api_version: str | None = Field(
        default=None, description="Pin the Kafka protocol version, e.g. '2.0.0'; unset = negotiate."
    )
    regions_topic: str = Field(default=REGIONS, description="Topic the Region records go to.")
    partitions: int = Field(default=3, ge=1, description="Partitions of the regions topic when created.")
    ensure_topic: bool = Field(default=True, description="Create the topic if missing / check it.")

    dataset: FilePath = Field(description="COCO-format JSON (COCO, Objects365, LVIS, ...).")
    image_root: str | None = Field(default=None, description="Folder or URI prefix of relative file names.")
    dataset_id: str = Field(default="", description="Dataset id in region ids; '' = the file's stem.")
    include_crowd: bool = Field(default=False, description="Use iscrowd=1 annotations as objects.")

    seed: int = Field(default=0, ge=0, description="Seed of the region sequence (same seed, same regions).")
    regions_per_image: int = Field(default=1, ge=1, description="Draws per image (duplicates dropped).")
    k: int = Field(default=DEFAULT_K, ge=0, description="A region grows until it holds more than k objects.")
    pad: float = Field(default=0.0, ge=0, description="Padding of the region box, times its width/height.")
    max_regions: int = Field(default=0, ge=0, description="Stop after this many regions; 0 = the whole run.")

    rate: float = Field(default=10.0, ge=0, description="Regions per second (token bucket); 0 = unlimited.")
    burst: int = Field(default=1, ge=1, description="Token bucket size: regions sent at once after a pause.")
    batch_size: int = Field(
        default=32, ge=1, description="Regions between two waits for the broker's acknowledgements."
    )

    run_id: str = Field(
        default="", description="Run the records belong to; '' = derived from dataset, seed and sampler."
    )
    restart: bool = Field(
        default=False, description="Sample the run again from its start instead of resuming it (--restart)."
    )

    metrics_enabled: bool = Field(default=True, description="Serve Prometheus metrics over HTTP at /metrics.")
    metrics_host: str = Field(default="127.0.0.1", description="Address of the metrics endpoint.")
    metrics_port: int = Field(default=9451, ge=0, le=65535, description="Prometheus metrics port.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="Log level.")

    def kafka(self) -> KafkaSettings:
        """The shared Kafka client settings."""
        version = tuple(int(p) for p in self.api_version.split(".")) if self.api_version else None
        return KafkaSettings(
            bootstrap_servers=self.bootstrap_servers, client_id="spr-sampler", api_version=version
        )

    def effective_dataset_id(self) -> str:
        """The dataset id written into region ids."""
        return self.dataset_id or Path(self.dataset).stem

    def effective_run_id(self) -> str:
        """The run id: given, or derived from everything that decides the region sequence."""
        if self.run_id:
            return self.run_id
        parts = (self.effective_dataset_id(), self.seed, self.regions_per_image, self.k, str(self.pad))
        return "sampler-" + stable_id("sampler-run", *parts, SAMPLER_VERSION)
