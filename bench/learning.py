"""Learning benchmark: no-context QA on SQuAD passages after a fresh per-passage LoRA.

For every passage of ``--data`` (JSONL: id, title, context, questions[{question, answers}])
a fresh adapter is trained from the base model and the passage's questions are asked
*without* the passage (``Topic: {title}\\n{question}``, greedy, <= 64 tokens), under:

* ``base``: no adapter;  ``in_context``: no adapter, the passage in the prompt (the ceiling);
* ``passage``: an adapter trained on the passage only;
* ``self_edit``: passage + self-edits sampled from the base model (SEAL formats);
* ``restem_1``, ``restem_2``: passage + self-edits from the policy after 1 / 2 ReSTEM rounds
  run on ``--train`` (workers/restem, served in-process by bench/learning_restem.py).

Scores are SQuAD token F1, exact match and "gold contained in the reply", pooled over
questions, with 95% bootstrap CIs over passages. Everything runs in this process: our vLLM
engine (AsyncLLM, LoRA per request, our LoRA plugin via its entry point) and PEFT training.

Run from the repo root: ``.venv/bin/python -m bench.learning --limit 2`` (smoke), or see
bench/README.md. Writes ``bench/results/<name>.json``, ``<name>.png`` and
``<name>-answers.json``; finished work is cached in ``--work-dir``, so a rerun with the same
settings resumes where the last one stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.settings import PipelineSettings, RestemSettings
from app.signals import exit_on_sigterm
from bench.learning_stats import CONDITIONS, table
from workers.training.peft_trainer import LoRAHyper

logger = logging.getLogger("bench.learning")

RESULTS = Path(__file__).resolve().parent / "results"
RUN_ORDER = ("base", "in_context", "passage", "self_edit", "restem_2", "restem_1")
"""Cheap conditions first, then the one the issue's targets hinge on: an interrupted run has
written those already."""
DATA = Path("../shared/data")
# Flags that name outputs or subsets, not what a condition computes: not in the cache key.
_NOT_IN_KEY = frozenset(
    {"name", "out_dir", "work_dir", "conditions", "limit", "log_level", "train_threads", "note"}
)


def build_parser() -> argparse.ArgumentParser:
    pipe, restem = PipelineSettings(), RestemSettings()
    p = argparse.ArgumentParser(
        prog="python -m bench.learning",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data and outputs")
    g.add_argument("--data", type=Path, default=DATA / "squad-dev.jsonl")
    g.add_argument("--train", type=Path, default=DATA / "squad-train.jsonl", help="ReSTEM docs")
    g.add_argument("--model", type=Path, help="HF causal-LM dir; None: the bundled SmolLM2")
    g.add_argument("--limit", type=int, help="first N passages of --data")
    g.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    g.add_argument("--name", default="learning", help="output file stem")
    g.add_argument("--out-dir", type=Path, default=RESULTS)
    g.add_argument("--note", help="a remark stored in the JSON, e.g. why conditions were left out")
    g.add_argument(
        "--work-dir", type=Path, help="cache; None: ~/.cache/selfadapt-bench/learning-<hash>"
    )
    g = p.add_argument_group("self-edits (self_edit condition)")
    g.add_argument("--formats", nargs="+", default=list(pipe.formats))
    g.add_argument("--k", type=int, default=pipe.self_edits_per_doc, help="self-edits/passage")
    g.add_argument("--temperature", type=float, default=pipe.self_edit_temperature)
    g.add_argument("--top-p", type=float, default=pipe.self_edit_top_p)
    g.add_argument("--self-edit-max-tokens", type=int, default=pipe.self_edit_max_tokens)
    g.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="FORMAT=TEMPLATE",
        help="prompt template for a format ({title}, {text}); @FILE reads it from a file",
    )
    g = p.add_argument_group("inner loop (one fresh LoRA per passage)")
    g.add_argument("--rank", type=int, default=pipe.rank)
    g.add_argument("--alpha", type=int, default=pipe.alpha)
    g.add_argument("--targets", nargs="+", default=list(pipe.targets))
    g.add_argument("--lr", type=float, default=pipe.lr)
    g.add_argument("--epochs", type=float, default=pipe.epochs)
    g.add_argument("--steps", type=int, help="fixed optimizer steps (overrides --epochs)")
    g.add_argument("--max-steps", type=int, default=pipe.max_steps, help="cap on steps")
    g.add_argument("--batch-size", type=int, default=pipe.batch_size)
    g.add_argument("--max-seq-len", type=int, default=pipe.max_seq_len)
    g.add_argument(
        "--sentences",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also train on each passage sentence (pipeline default; SEAL: no)",
    )
    g.add_argument("--seed", type=int, default=pipe.seed)
    g.add_argument(
        "--train-threads", type=int, help="torch CPU threads; None: all cores but one on CPU"
    )
    g = p.add_argument_group("evaluation and engine")
    g.add_argument("--eval-max-tokens", type=int, default=pipe.eval_max_tokens)
    g.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    g.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    g.add_argument("--max-loras", type=int, default=8, help="adapters per engine batch")
    g.add_argument("--kv-cache-gib", type=int, default=2)
    g.add_argument("--max-model-len", type=int, default=2048)
    g = p.add_argument_group("ReSTEM (restem_1, restem_2 conditions; defaults: RestemSettings)")
    g.add_argument("--restem-rounds", type=int, default=2)
    g.add_argument("--restem-docs", type=int, default=restem.docs, help="N docs per round")
    g.add_argument("--restem-samples", type=int, default=restem.samples, help="K per doc")
    g.add_argument("--restem-repeats", type=int, default=restem.repeats)
    g.add_argument(
        "--restem-policy",
        choices=("promoted", "candidate"),
        default="promoted",
        help="sample restem_r from the policy the gate left in force, or round r's candidate",
    )
    g.add_argument(
        "--restem",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="any other RestemSettings field, e.g. policy_lr=3e-4 or formats='[\"rewrite\"]'",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def _template(value: str) -> str:
    return Path(value[1:]).read_text() if value.startswith("@") else value


def _pairs(items: Sequence[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def finish(args: argparse.Namespace) -> argparse.Namespace:
    """Derived settings: prompts, ReSTEM settings, LoRA hyperparameters, paths, cache key."""
    from tests.support.models import bundled_model_dir, default_cache_root
    from workers.training.threads import default_threads

    # All cores but one on CPU, as the pipeline does: the engine's worker keeps a core busy.
    args.train_threads = args.train_threads or default_threads()

    prompts = {k: _template(v) for k, v in _pairs(args.prompt, "--prompt").items()}
    args.pipeline = PipelineSettings(
        formats=args.formats,
        prompts=prompts,
        self_edits_per_doc=args.k,
        self_edit_temperature=args.temperature,
        self_edit_top_p=args.top_p,
        self_edit_max_tokens=args.self_edit_max_tokens,
    )
    extra = {k: json.loads(v) for k, v in _pairs(args.restem, "--restem").items()}
    args.restem_settings = RestemSettings.model_validate(
        {
            **extra,
            "rounds": args.restem_rounds,
            "docs": args.restem_docs,
            "samples": args.restem_samples,
            "repeats": args.restem_repeats,
            "prompts": {**prompts, **extra.get("prompts", {})},
        }
    )
    args.hyper = LoRAHyper(
        rank=args.rank,
        alpha=args.alpha,
        target_modules=tuple(args.targets),
        lr=args.lr,
        steps=args.steps,
        batch_size=args.batch_size,
        max_len=args.max_seq_len,
        seed=args.seed,
        num_threads=args.train_threads,
    )
    args.model_dir = args.model or bundled_model_dir(default_cache_root())
    args.conditions = [c for c in RUN_ORDER if c in args.conditions]
    args.settings = recorded_settings(args)
    key = hashlib.sha256(json.dumps(args.settings, sort_keys=True).encode()).hexdigest()[:12]
    args.work_dir = args.work_dir or Path.home() / ".cache" / "selfadapt-bench" / f"learning-{key}"
    return args


def recorded_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a result depends on (JSON-safe): flags, ReSTEM settings, data identity."""
    flags = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in _NOT_IN_KEY and isinstance(v, str | int | float | bool | list | Path | None)
    }
    return {
        **flags,
        "prompts": args.pipeline.prompts,
        "restem": args.restem_settings.model_dump(mode="json"),
        "data_sha256": _sha256(args.data),
        "train_sha256": _sha256(args.train),
    }


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; exit status 2 on bad input (data file, settings)."""
    import asyncio

    from bench.learning_run import run

    exit_on_sigterm()
    args = finish(build_parser().parse_args(argv))
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    try:
        result = asyncio.run(run(args))
    except (ValueError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 2
    sys.stdout.write(table(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
