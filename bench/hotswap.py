"""Hot-swap benchmark: two gateways on one PostgreSQL + Redis; promotions through one, traffic on
the other. Measures how fast a promotion propagates and what swapping costs the traffic.

Run from the repo root: ``.venv/bin/python -m bench.hotswap [--swaps 20]``. Writes
``bench/results/hotswap.json`` and ``bench/results/hotswap.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.auth import Role
from app.signals import exit_on_sigterm
from tests.app.registry.cluster import Champion, Cluster, import_adapter, was_champion
from tests.factories import temp_database_url
from tests.support.models import VEXTORIA, ZORBLAT, bundled_model_dir, default_cache_root
from tests.support.models import fact_adapter as train_fact_adapter

logger = logging.getLogger("bench.hotswap")

NS = "bench"
RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"propagation_p99_ms": 1000.0, "failed_requests": 0, "swap_latency_ratio": 1.2}


@dataclass
class Sample:
    """One streamed-load request to gateway B."""

    start: float
    end: float
    ok: bool
    model: str | None
    phase: str
    error: str | None = None

    @property
    def latency_ms(self) -> float:
        return (self.end - self.start) * 1000


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    history: list[Champion] = field(default_factory=list)
    propagation_ms: list[float] = field(default_factory=list)
    probe_failures: int = 0
    phase: str = "warmup"


def _chat(model: str, max_tokens: int, text: str = "Say hello.") -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }


async def _stream(client: httpx.AsyncClient, run: Run, stop: asyncio.Event, tokens: int) -> None:
    while not stop.is_set():
        start = time.monotonic()
        phase = run.phase
        try:
            r = await client.post("/v1/chat/completions", json=_chat(NS, tokens))
            ok = r.status_code == 200
            model = r.json().get("model") if ok else None
            error = None if ok else r.text[:200]
        except httpx.HTTPError as e:
            ok, model, error = False, None, repr(e)
        run.samples.append(Sample(start, time.monotonic(), ok, model, phase, error))


async def _probe(client: httpx.AsyncClient, expected: str, run: Run, timeout_s: float) -> float:
    """ms from now until a response from B names `expected` (short requests, back to back)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            r = await client.post("/v1/chat/completions", json=_chat(NS, 1))
        except httpx.HTTPError:
            run.probe_failures += 1
            continue
        if r.status_code != 200:
            run.probe_failures += 1
        elif r.json()["model"] == expected:
            return (time.monotonic() - start) * 1000
    raise TimeoutError(f"B never served {expected} within {timeout_s} s")


async def _change(
    admin: httpx.AsyncClient, run: Run, to_version: int, *, rollback: bool = False
) -> Champion:
    start = time.monotonic()
    if rollback:
        path, body = f"/v1/admin/namespaces/{NS}/rollback", {"to_version": to_version}
    else:
        path, body = f"/v1/admin/namespaces/{NS}/versions/{to_version}/promote", {}
    r = await admin.post(path, json={**body, "reason": "bench"})
    r.raise_for_status()
    change = Champion(r.json()["champion"]["name"], start, time.monotonic())
    run.history.append(change)
    return change


async def _phase(
    name: str, run: Run, clients: dict[str, httpx.AsyncClient], args: argparse.Namespace
) -> None:
    """`args.swaps` rounds, one every `pause_s`: a promotion (or nothing, in the steady phase)
    followed by probing B, so both phases put the same extra requests on B."""
    run.phase = name
    for i in range(args.swaps):
        await asyncio.sleep(args.pause_s)
        if name == "swaps":
            promote = i % 2 == 0  # promote v2, roll back to v1, ...
            change = await _change(clients["a"], run, 2 if promote else 1, rollback=not promote)
            run.propagation_ms.append(await _probe(clients["b"], change.name, run, 10.0))
        else:
            await _probe(clients["b"], run.history[-1].name, run, 10.0)
    run.phase = "cooldown"


async def _measure(cluster: Cluster, args: argparse.Namespace) -> Run:
    run = Run()
    headers = cluster.headers(Role.user)
    async with (
        httpx.AsyncClient(base_url=cluster.url("a"), headers=cluster.headers(), timeout=120) as a,
        httpx.AsyncClient(base_url=cluster.url("b"), headers=headers, timeout=120) as b,
    ):
        clients = {"a": a, "b": b}
        for version in (2, 1):  # both versions loaded in both engines before measuring
            change = await _change(a, run, version)
            await _probe(b, change.name, run, 30.0)
        stop = asyncio.Event()
        streams = [
            asyncio.create_task(_stream(b, run, stop, args.max_tokens))
            for _ in range(args.concurrency)
        ]
        try:
            await asyncio.sleep(2.0)
            await _phase("steady", run, clients, args)
            await _phase("swaps", run, clients, args)
        finally:
            stop.set()
            await asyncio.gather(*streams)
    return run


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _summary(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    steady = [s.latency_ms for s in run.samples if s.phase == "steady" and s.ok]
    swaps = [s.latency_ms for s in run.samples if s.phase == "swaps" and s.ok]
    failed = [s for s in run.samples if not s.ok]
    wrong = [
        s
        for s in run.samples
        if s.ok and not was_champion(run.history, s.model or "", s.start, s.end)
    ]
    p99_steady, p99_swaps = _pct(steady, 99), _pct(swaps, 99)
    ratio = p99_swaps / p99_steady if p99_steady and p99_swaps else None
    result: dict[str, Any] = {
        "propagation_p50_ms": _pct(run.propagation_ms, 50),
        "propagation_p99_ms": _pct(run.propagation_ms, 99),
        "propagation_max_ms": max(run.propagation_ms, default=None),
        "failed_requests": len(failed) + run.probe_failures,
        "wrong_version_responses": len(wrong),
        "latency_p50_steady_ms": _pct(steady, 50),
        "latency_p99_steady_ms": p99_steady,
        "latency_p50_during_swaps_ms": _pct(swaps, 50),
        "latency_p99_during_swaps_ms": p99_swaps,
        "swap_latency_ratio": ratio,
        "requests_steady": len(steady),
        "requests_during_swaps": len(swaps),
        "requests_total": len(run.samples),
        "swaps": len(run.propagation_ms),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "targets": TARGETS,
        "errors": [s.error for s in failed[:5]],
    }
    p99 = result["propagation_p99_ms"]
    result["meets_targets"] = bool(
        p99 is not None
        and p99 <= TARGETS["propagation_p99_ms"]
        and not failed
        and not run.probe_failures
        and ratio is not None
        and ratio <= TARGETS["swap_latency_ratio"]
    )
    return result


def _plot(run: Run, result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(s.start for s in run.samples)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), width_ratios=[2, 1])
    for phase, color in (("steady", "tab:blue"), ("swaps", "tab:orange")):
        pts = [(s.start - t0, s.latency_ms) for s in run.samples if s.phase == phase and s.ok]
        left.scatter([p[0] for p in pts], [p[1] for p in pts], s=6, color=color, label=phase)
    for change in run.history[2:]:
        left.axvline(change.returned - t0, color="grey", alpha=0.3, linewidth=0.8)
    left.set_xlabel("time (s); grey lines: promotion calls returning")
    left.set_ylabel("request latency on gateway B (ms)")
    left.set_title("steady stream on B while A promotes")
    left.legend(fontsize=8)
    labels = ["latency p50", "latency p99", "propagation p50", "propagation p99"]
    values = [
        result["latency_p50_steady_ms"],
        result["latency_p99_steady_ms"],
        result["latency_p50_during_swaps_ms"],
        result["latency_p99_during_swaps_ms"],
        result["propagation_p50_ms"],
        result["propagation_p99_ms"],
    ]
    xs = [0, 1, 3, 4]
    right.bar([x - 0.2 for x in xs[:2]], values[0:2], 0.4, label="steady")
    right.bar([x + 0.2 for x in xs[:2]], values[2:4], 0.4, label="during swaps")
    right.bar(xs[2:], values[4:6], 0.5, label="propagation", color="tab:green")
    right.axhline(
        TARGETS["propagation_p99_ms"],
        color="red",
        linestyle="--",
        linewidth=0.8,
        label="propagation p99 target",
    )
    right.set_xticks(xs, labels, rotation=20, fontsize=8)
    right.set_ylabel("ms")
    right.set_title(f"{result['swaps']} swaps, {result['failed_requests']} failed requests")
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--swaps", type=int, default=20, help="promotions (and steady rounds)")
    p.add_argument("--pause-s", type=float, default=1.0, help="seconds between rounds")
    p.add_argument("--concurrency", type=int, default=2, help="streaming clients on B")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per streamed request")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    exit_on_sigterm()
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    cache = default_cache_root()
    model_dir = bundled_model_dir(cache)
    facts = [train_fact_adapter(cache, model_dir, f.name, f.examples) for f in (ZORBLAT, VEXTORIA)]
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hotswap-")))
        url = stack.enter_context(temp_database_url("postgresql", root))
        cluster = Cluster(
            root=root, model_dir=model_dir, database_url=url, redis_url=args.redis_url
        )
        stack.callback(cluster.stop_all)
        logger.info("starting gateways a and b")
        cluster.start("a", "b")
        with httpx.Client(base_url=cluster.url("a"), timeout=120) as a:
            for folder in facts:
                import_adapter(a, NS, folder, cluster.headers())
        run = asyncio.run(_measure(cluster, args))
    result = _summary(run, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hotswap.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(run, result, args.out / "hotswap.png")
    samples = {
        "samples": [asdict(s) for s in run.samples],
        "history": [asdict(c) for c in run.history],
    }
    (args.out / "hotswap_samples.log").write_text(json.dumps(samples))  # raw data, git-ignored
    logger.info("results: %s", json.dumps({k: v for k, v in result.items() if k != "config"}))
    return result


if __name__ == "__main__":
    main()
