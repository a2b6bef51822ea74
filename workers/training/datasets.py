"""Training-set assembly: documents + self-edits (+ replay of earlier namespace data) -> sequences.

SEAL's recipe (``build_train_sequences``): a self-edit is split into segments (QA pairs kept
together, otherwise one line each, a "Sure, here are..." preamble dropped), each becomes
``"{title}\\n{segment}"``, and the raw passage ``"{title}\\n{text}"`` is always included. We add
each document sentence as its own sequence (measured to help the 135M model, see
notes/learning-premise.md) and drop self-edit lines whose content words are mostly absent from
the document: a small model's samples invent names, and training on them teaches wrong facts.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from workers.metrics import normalize_answer

_QUESTION_START = re.compile(r"(?=^\s*(?:Question|Q)\s*\d*\s*[:.)])", re.IGNORECASE | re.MULTILINE)
_HAS_ANSWER = re.compile(r"^\s*(?:Answer|A)\s*\d*\s*[:.)]", re.IGNORECASE | re.MULTILINE)
_ANSWER_START = re.compile(r"(?=^\s*(?:Answer|A)\s*\d*\s*[:.)])", re.IGNORECASE | re.MULTILINE)
_QA_SEGMENT = re.compile(r"\b[Aa]nswer\s*\d*\s*:|(?:^|\s)A\s*\d*\s*:")
_LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|(?:Implication|Rewrite)\s*\d*\s*:)\s*", re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[A-Z0-9\"'(\[])")
_PREAMBLE = re.compile(
    r"^(sure|certainly|of course|here (is|are)|i'm here|i am here|implications?:?$|"
    r"rewritten passages?:?$|let's)",
    re.IGNORECASE,
)
_STOPWORD_TEXT = """
is are was were be been being of in on at to for from by with and or but as it its this that
these those which who whom what when where why how their there they them he she his her we you
your our not no also has have had do does did can could will would may might than then into
about over under after before between each every any all some more most other such
"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
MIN_GROUNDED = 0.6
"""Share of a self-edit line's content words that must occur in the document."""


@dataclass(frozen=True)
class DocumentData:
    """One document's training material: its text and kept self-edit texts."""

    title: str
    text: str
    self_edits: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainingSet:
    """Sequences to train on; ``n_new`` come from this job, ``n_replay`` from earlier jobs."""

    sequences: tuple[str, ...]
    n_new: int
    n_replay: int
    sources: dict[str, int] = field(default_factory=dict)


def content_words(text: str) -> list[str]:
    return [w for w in normalize_answer(text).split() if w not in _STOPWORDS and len(w) > 1]


def grounded_fraction(line: str, document: str) -> float:
    """Share of ``line``'s content words that occur in ``document`` (1.0 for no content)."""
    words = content_words(line)
    if not words:
        return 1.0
    vocabulary = set(content_words(document))
    return sum(w in vocabulary for w in words) / len(words)


def split_sentences(text: str) -> list[str]:
    """Sentences of a passage (a regex splitter: good enough for prose, no model needed)."""
    sentences: list[str] = []
    for paragraph in re.split(r"\n\s*\n|\n(?=\s*[-*#\d])", text):
        flat = " ".join(paragraph.split())
        sentences.extend(s.strip() for s in _SENTENCE_END.split(flat) if s.strip())
    return sentences


def self_edit_segments(completion: str) -> list[str]:
    """SEAL's split: ``---`` blocks; QA pairs kept together; otherwise one segment per line."""
    segments: list[str] = []
    for block in completion.split("---"):
        if _HAS_ANSWER.search(block) and _QUESTION_START.search(block):
            for part in _QUESTION_START.split(block):
                segments.extend(" ".join(p.split()) for p in _qa_pair_and_extras(part) if p)
            continue
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if len(lines) > 1 and _PREAMBLE.match(lines[0]):
            lines = lines[1:]
        segments.extend(lines)
    cleaned = (_LIST_MARKER.sub("", s).strip() for s in segments)
    return [s for s in cleaned if s and not _PREAMBLE.match(s)]


def _qa_pair_and_extras(part: str) -> list[str]:
    """A question with its first answer, then every further answer of that question as a
    statement of its own (small models run on: "Answer 2: ...", "Answer 3: ..." after one
    question; one invented answer must not cost the grounded ones)."""
    question, *answers = _ANSWER_START.split(part.strip())
    if not answers:
        return [question.strip()]
    extras = [_HAS_ANSWER.sub("", a, count=1).strip() for a in answers[1:]]
    return [f"{question.strip()} {answers[0].strip()}", *extras]


def novel_names(line: str, document: str) -> list[str]:
    """Capitalised words of ``line`` (not sentence-initial) that the document never uses."""
    known = set(normalize_answer(document).split())
    names = []
    for sentence in split_sentences(line):
        for word in re.findall(r"(?<=\s)[A-Z][\w'-]+", sentence):
            if normalize_answer(word) not in known and word.lower() not in _STOPWORDS:
                names.append(word)
    return names


_QA_LABEL = re.compile(r"\b(?:Question|Answer|Q|A)\s*\d*\s*:", re.IGNORECASE)


def is_grounded(segment: str, document: str) -> bool:
    """A restatement of the document: enough content words from it and no invented names
    (``Question 1:``/``Answer 1:`` labels are not content)."""
    body = _QA_LABEL.sub(" ", segment)
    return (
        len(content_words(body)) >= 2
        and grounded_fraction(body, document) >= MIN_GROUNDED
        and not novel_names(body, document)
    )


def grounded_segments(completion: str, document: str) -> list[str]:
    """The self-edit's segments that restate the document; prose is split into sentences
    (one sequence each, as for the document itself) so one invented clause costs one
    sentence rather than the whole rewrite."""
    out: list[str] = []
    for segment in self_edit_segments(completion):
        parts = [segment] if _QA_SEGMENT.search(segment) else split_sentences(segment)
        out.extend(p for p in parts if is_grounded(p, document))
    return out


def document_sequences(
    doc: DocumentData, *, sentences: bool = True, max_edit_segments: int | None = None
) -> list[str]:
    """Training sequences of one document: self-edit segments (at most ``max_edit_segments``,
    taken round-robin over the self-edits), sentences, then the passage."""
    seen: set[str] = set()
    out: list[str] = []

    def add(segment: str) -> bool:
        key = normalize_answer(segment)
        if key and key not in seen:
            seen.add(key)
            out.append(f"{doc.title}\n{segment}")
            return True
        return False

    per_edit = [grounded_segments(edit, doc.text) for edit in doc.self_edits]
    budget = max_edit_segments if max_edit_segments is not None else sum(map(len, per_edit))
    for segment in _round_robin(per_edit):
        if budget <= 0:
            break
        budget -= add(segment)
    if sentences:
        for sentence in split_sentences(doc.text):
            add(sentence)
    passage = f"{doc.title}\n{doc.text.strip()}"
    if passage not in out:
        out.append(passage)  # always last, as SEAL does
    return out


def _round_robin(lists: Sequence[Sequence[str]]) -> Iterable[str]:
    for i in range(max(map(len, lists), default=0)):
        for items in lists:
            if i < len(items):
                yield items[i]


def replay_sample(pool: Sequence[str], n: int, *, seed: int | str) -> list[str]:
    """``n`` sequences drawn without replacement (all of them when the pool is smaller)."""
    if n <= 0 or not pool:
        return []
    if n >= len(pool):
        return list(pool)
    return random.Random(str(seed)).sample(list(pool), n)


def choose_replay(
    per_document: Sequence[Sequence[str]], n: int, *, passages_first: bool, seed: int | str
) -> list[str]:
    """``n`` replayed sequences from earlier documents' sequences (each document's list ends
    with its passage, `document_sequences`).

    With ``passages_first`` every earlier passage is replayed before any other sequence (a
    random draw, when there are more documents than ``n``): a passage states all of its
    document's facts, while a uniform draw over sentences and self-edit lines can leave out
    every sequence that carries one of them.
    """
    if n <= 0:
        return []
    if not passages_first:
        return replay_sample([s for seqs in per_document for s in seqs], n, seed=seed)
    passages = replay_sample([seqs[-1] for seqs in per_document if seqs], n, seed=seed)
    chosen = set(passages)
    rest = [s for seqs in per_document for s in seqs if s not in chosen]
    return passages + replay_sample(rest, n - len(passages), seed=seed)


def build_training_set(
    new_docs: Iterable[DocumentData],
    earlier_docs: Iterable[DocumentData] = (),
    *,
    replay_fraction: float = 1.0,
    replay_passages: bool = True,
    sentences: bool = True,
    max_edit_segments: int | None = None,
    seed: int | str = 0,
) -> TrainingSet:
    """This job's sequences plus ``replay_fraction`` x as many replayed earlier ones.

    Replay draws from every sequence the earlier documents would produce, so a replayed
    document is seen through its kept self-edits as well as its passage; with
    ``replay_passages`` the earlier passages come first (`choose_replay`).
    """

    def sequences(doc: DocumentData) -> list[str]:
        return document_sequences(doc, sentences=sentences, max_edit_segments=max_edit_segments)

    new = [s for doc in new_docs for s in sequences(doc)]
    earlier = [sequences(doc) for doc in earlier_docs]
    n = math.ceil(replay_fraction * len(new))
    replay = choose_replay(earlier, n, passages_first=replay_passages, seed=seed)
    return TrainingSet(
        sequences=(*new, *replay),
        n_new=len(new),
        n_replay=len(replay),
        sources={"new": len(new), "replay": len(replay), "replay_pool": sum(map(len, earlier))},
    )


def plan_steps(
    n_sequences: int,
    *,
    epochs: float,
    batch_size: int,
    steps: int | None = None,
    max_steps: int | None = None,
    min_steps: int = 1,
) -> int:
    """Optimizer steps for a training set: ``steps`` if given, else ``epochs`` passes.

    ``max_steps`` caps the CPU time of a job: past it, extra sequences are sampled less often
    rather than making every job slower.
    """
    if steps is None:
        steps = math.ceil(epochs * n_sequences / batch_size)
    if max_steps is not None:
        steps = min(steps, max_steps)
    return max(min_steps, steps)
