"""Guard-margin benchmark: how firmly the base model knows each guard question.

The gate's guard set (`app/data/guard_qa.jsonl`) must measure forgetting, not noise. A question
the base answers right greedily but only by a hair flips under any small weight change (seen in
the end-to-end test: the same few of 63 answers flipped whatever the new document taught, and
the gate's 0.05 budget is 3 answers), so it says nothing about what a candidate forgot.

For every question of the guard file and of ``--candidates`` this asks the base model, without
context and with the evaluation's prompt and token limit, once greedily and ``--samples`` times
sampled at ``--temperature``, and counts the answers that contain a gold answer. Given
``--perturbations`` (records of ``bench.forgetting``: adapters trained the pipeline's way on other
made-up documents, with the guard answers each one flipped from right to wrong) it also counts
how many of those adapters flipped each question. It writes one row per question to ``--out``.
With ``--write-guard`` it writes the questions the base answers greedily, in at least ``--keep``
of the samples, that no perturbation flipped and that are no anchor prompt (anchors are trained
on) as the new guard file, in input order.

Run from the repo root: ``.venv/bin/python -m bench.guard_margin`` (the README's "Guard set"
says how the shipped set was built).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.signals import exit_on_sigterm

logger = logging.getLogger("bench.guard_margin")
RESULTS = Path(__file__).resolve().parent / "results"
CANDIDATES = Path(__file__).resolve().parent / "data" / "guard_candidates.jsonl"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--guard", type=Path, default=None, help="guard file (default: the bundled)")
    p.add_argument("--candidates", type=Path, default=CANDIDATES, help="more questions to try")
    p.add_argument("--samples", type=int, default=16, help="sampled answers per question")
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--keep", type=float, default=0.75, help="share of samples that must be right")
    p.add_argument(
        "--perturbations",
        type=Path,
        action="append",
        default=[],
        help="bench.forgetting JSONL whose records' flips mark a question fragile (repeatable)",
    )
    p.add_argument("--model", type=Path, default=None, help="HF model dir (default: bundled)")
    p.add_argument("--out", type=Path, default=RESULTS / "guard_margin.json")
    p.add_argument("--write-guard", type=Path, default=None, help="write the kept questions here")
    return p


def firmly_known(row: dict[str, Any], *, need: float) -> bool:
    """A guard question: answered greedily, in ``need`` samples or more, flipped by no
    perturbation adapter, and no anchor prompt (anchors are trained on)."""
    return bool(
        row["greedy_right"]
        and not row["anchor"]
        and row["sampled_right"] >= need
        and row["flipped_by"] == 0
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from app.engine.local import LocalEngine
    from app.model_prep import resolve_model_dir
    from app.settings import EngineSettings, PipelineSettings, Settings
    from bench.learning_engine import InProcessChat
    from workers.metrics import best_of
    from workers.tasks.anchors import load_anchor_prompts
    from workers.tasks.common import qa_messages
    from workers.tasks.evaluate import GUARD_FILE, load_guard

    guard_file = args.guard or GUARD_FILE
    seen: set[str] = set()
    items: list[dict[str, Any]] = []
    for source, path in (("guard", guard_file), ("candidate", args.candidates)):
        for item in load_guard(path):
            if item.question not in seen:
                seen.add(item.question)
                items.append(
                    {
                        "title": item.title,
                        "question": item.question,
                        "answers": item.answers,
                        "source": source,
                    }
                )
    anchors = set(load_anchor_prompts())
    runs = [
        json.loads(line)
        for path in args.perturbations
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    flipped = [{flip[0] for flip in run["flips"]} for run in runs]
    max_tokens = PipelineSettings().eval_max_tokens
    model_dir = args.model or resolve_model_dir(Settings(), progress=False)
    engine = LocalEngine(model_dir, EngineSettings(kv_cache_space_gib=2))
    chat = InProcessChat(engine)
    limit = asyncio.Semaphore(16)

    def right(answer: str, golds: tuple[str, ...]) -> bool:
        return best_of(answer, golds)[2] == 1.0  # contains, as the gate's guard metric

    async def measure(item: dict[str, Any]) -> dict[str, Any]:
        messages = qa_messages(item["title"], item["question"])
        async with limit:
            greedy = (await chat.chat("base", messages, max_tokens=max_tokens))[0]
            sampled = await chat.chat(
                "base",
                messages,
                temperature=args.temperature,
                max_tokens=max_tokens,
                n=args.samples,
            )
        hits = sum(right(s, item["answers"]) for s in sampled)
        return {
            **item,
            "anchor": messages[0]["content"] in anchors,
            "greedy": greedy.strip(),
            "greedy_right": right(greedy, item["answers"]),
            "sampled_right": hits,
            "flipped_by": sum(item["question"] in f for f in flipped),
            "missed": [s.strip() for s in sampled if not right(s, item["answers"])][:4],
        }

    started = time.perf_counter()
    try:
        rows = await asyncio.gather(*(measure(item) for item in items))
    finally:
        await engine.shutdown()
    for row in rows:
        row["kept"] = firmly_known(row, need=args.keep * args.samples)
    result = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": str(model_dir),
        "samples": args.samples,
        "temperature": args.temperature,
        "keep": args.keep,
        "perturbations": [
            {k: run.get(k) for k in ("doc", "name", "steps", "guard", "probe_contains")}
            for run in runs
        ],
        "seconds": round(time.perf_counter() - started, 1),
        "questions": len(rows),
        "kept": sum(r["kept"] for r in rows),
        "guard_kept": sum(r["kept"] for r in rows if r["source"] == "guard"),
        "guard_questions": sum(r["source"] == "guard" for r in rows),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.write_guard is not None:
        lines = [
            json.dumps({k: r[k] for k in ("title", "question", "answers")})
            for r in rows
            if r["kept"]
        ]
        args.write_guard.write_text("\n".join(lines) + "\n")
    return result


def main() -> None:
    args = _parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    exit_on_sigterm()
    result = asyncio.run(run(args))
    for row in result["rows"]:
        mark = "kept" if row["kept"] else "    "
        logger.info(
            "%s %2d/%d flipped %d/%d %s%s %-9s %s",
            mark,
            row["sampled_right"],
            result["samples"],
            row["flipped_by"],
            len(result["perturbations"]),
            "G" if row["greedy_right"] else "-",
            "A" if row["anchor"] else " ",
            row["source"],
            row["question"],
        )
    logger.info(
        "kept %d of %d questions (%d of the %d guard questions) in %.1f s -> %s",
        result["kept"],
        result["questions"],
        result["guard_kept"],
        result["guard_questions"],
        result["seconds"],
        args.out,
    )


if __name__ == "__main__":
    main()
