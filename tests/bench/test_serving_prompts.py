"""bench.serving's prompts share no KV block: they differ right after the chat template's
system turn, so even 16-token blocks (vLLM's GPU default) find no common prefix beyond it."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from bench.serving import PromptBook


def _first_difference(a: list[int], b: list[int]) -> int:
    return next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)


def test_prompts_differ_from_their_first_token(model_dir: Path) -> None:
    book = PromptBook(model_dir, 128)
    tok = AutoTokenizer.from_pretrained(model_dir)

    def rendered(content: str) -> list[int]:
        return list(
            tok.apply_chat_template(
                [{"role": "user", "content": content}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        )

    template = rendered("")
    turn = _first_difference(template, rendered("x"))  # where the user's content starts
    prompts = [rendered(p) for p in book.prompts("lora4_c64", 24)]
    for a in prompts:
        for b in prompts:
            if a is not b:
                assert _first_difference(a, b) <= turn + 1, "a shared block beyond the system turn"
    assert all(120 <= len(p) <= 136 for p in prompts)  # --input-tokens 128, rendered
