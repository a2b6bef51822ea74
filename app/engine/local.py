"""In-process vLLM AsyncLLM engine: start/stop, tokenisation, generation, LoRA loading."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.engine.base import (
    ChoiceDelta,
    EngineStep,
    LoRATarget,
    SamplingOptions,
    TokenLogprob,
)
from app.engine.dtype import resolve_dtype
from app.engine.kv_blocks import engine_block_size
from app.errors import APIError, EngineUnavailable, InvalidRequest
from app.settings import EngineSettings

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)


class AdapterLoadFailed(APIError):
    status_code = 500
    type = "server_error"
    code = "adapter_load_failed"


def _device_is_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch comes with vllm
        return True


class LocalEngine:
    """vLLM's AsyncLLM running inside this process (its workers are child processes)."""

    def __init__(self, model_dir: Path, settings: EngineSettings) -> None:
        self._model_dir = model_dir
        self._settings = settings
        self._llm: AsyncLLM | None = None
        self._tokenizer: Any = None
        self._loaded_loras: set[int] = set()
        self._lora_lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return self._llm is not None

    @property
    def max_model_len(self) -> int:
        return self._settings.max_model_len

    def _engine_args(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs

        s = self._settings
        kwargs: dict[str, Any] = {
            "model": str(self._model_dir),
            "dtype": resolve_dtype(s.dtype),
            "max_model_len": s.max_model_len,
            "max_num_seqs": s.max_num_seqs,
            "enforce_eager": s.enforce_eager,
            "disable_log_stats": True,
        }
        block_size = engine_block_size(s.block_size, on_cpu=_device_is_cpu())
        if block_size is not None:
            kwargs["block_size"] = block_size
        if s.enable_lora:
            kwargs.update(
                enable_lora=True,
                max_loras=s.max_loras,
                max_cpu_loras=max(s.max_cpu_loras, s.max_loras),
                max_lora_rank=s.max_lora_rank,
            )
        if not _device_is_cpu():
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
        return AsyncEngineArgs(**kwargs)

    async def start(self) -> None:
        """Build the engine (tens of seconds on CPU; compiles on the first start)."""
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self._settings.kv_cache_space_gib))
        from vllm.v1.engine.async_llm import AsyncLLM

        args = self._engine_args()
        logger.info("starting vLLM engine on %s", self._model_dir)
        # Built in a worker thread so the gateway keeps answering /healthz and /readyz while the
        # engine loads; AsyncLLM starts its output tasks lazily on the first request.
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        self._tokenizer = llm.get_tokenizer()
        self._llm = llm
        logger.info("vLLM engine ready")

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()

    def _require(self) -> AsyncLLM:
        if self._llm is None:
            raise EngineUnavailable(
                "The model is still loading; retry shortly.", headers={"Retry-After": "5"}
            )
        return self._llm

    def encode(self, text: str) -> list[int]:
        self._require()
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False)
        return ids

    def render_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        self._require()
        try:
            text = self._tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # jinja errors on unsupported roles/content
            raise InvalidRequest(f"Cannot apply the chat template: {e}", param="messages") from e
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False)
        return ids

    def queue_depth(self) -> int:
        return self._llm.get_num_unfinished_requests() if self._llm is not None else 0

    async def load_adapter(self, lora: LoRATarget) -> None:
        """Load an adapter before its first request, so a bad one fails here, not in a batch."""
        if lora.lora_id in self._loaded_loras:
            return
        llm = self._require()
        async with self._lora_lock:
            if lora.lora_id in self._loaded_loras:
                return
            try:
                await llm.add_lora(_lora_request(lora))
            except Exception as e:
                raise AdapterLoadFailed(
                    f"Adapter '{lora.name}' could not be loaded: {e}", param="model"
                ) from e
            self._loaded_loras.add(lora.lora_id)

    async def unload_adapter(self, lora_id: int) -> None:
        """Drops an adapter from the engine (GPU slot and CPU cache); a no-op when absent."""
        llm = self._require()
        async with self._lora_lock:
            self._loaded_loras.discard(lora_id)
            await llm.remove_lora(lora_id)

    async def generate(
        self,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        *,
        request_id: str,
        lora: LoRATarget | None,
    ) -> AsyncIterator[EngineStep]:
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.inputs.engine import tokens_input
        from vllm.v1.engine.exceptions import EngineDeadError

        llm = self._require()
        if lora is not None:
            await self.load_adapter(lora)
        params = _sampling_params(options)
        lora_request = _lora_request(lora) if lora is not None else None
        try:
            async for out in llm.generate(
                tokens_input(prompt_token_ids),
                params,
                request_id,
                lora_request=lora_request,
            ):
                yield EngineStep(
                    choices=[_choice(c, options.logprobs) for c in out.outputs],
                    finished=out.finished,
                )
        except GracefulHTTPError as e:
            raise EngineUnavailable(
                e.message, code="engine_busy", headers={"Retry-After": "1"}
            ) from e
        except VLLMClientError as e:
            raise InvalidRequest(str(e), param=getattr(e, "parameter", None)) from e
        except EngineDeadError as e:
            raise EngineUnavailable("The inference engine stopped; restart the server.") from e


def _lora_request(lora: LoRATarget) -> Any:
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora.name, lora.lora_id, str(lora.path))


def _sampling_params(options: SamplingOptions) -> Any:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(
        n=options.n,
        temperature=options.temperature,
        top_p=options.top_p,
        max_tokens=options.max_tokens,
        min_tokens=options.min_tokens,
        stop=list(options.stop) or None,
        seed=options.seed,
        logprobs=options.logprobs,
        ignore_eos=options.ignore_eos,
        output_kind=RequestOutputKind.DELTA,
    )


def _choice(c: Any, want_logprobs: int | None) -> ChoiceDelta:
    logprobs = None
    if want_logprobs is not None and c.logprobs is not None:
        logprobs = [
            _token_logprob(tok, pos, want_logprobs)
            for tok, pos in zip(c.token_ids, c.logprobs, strict=False)
        ]
    return ChoiceDelta(
        index=c.index,
        text=c.text,
        num_tokens=len(c.token_ids),
        logprobs=logprobs,
        finish_reason=c.finish_reason,
    )


def _token_logprob(token_id: int, position: dict[int, Any] | None, k: int) -> TokenLogprob:
    if not position:
        return TokenLogprob(token="", logprob=0.0)
    chosen = position.get(token_id)
    # vLLM adds the sampled token to the top-k when it ranks lower; OpenAI lists exactly k.
    ranked = sorted(
        (lp for lp in position.values() if lp.rank is not None and lp.rank <= k),
        key=lambda lp: lp.rank,
    )
    top = tuple((lp.decoded_token or "", float(lp.logprob)) for lp in ranked)
    if chosen is None:
        return TokenLogprob(token="", logprob=float("-inf"), top=top)
    return TokenLogprob(token=chosen.decoded_token or "", logprob=float(chosen.logprob), top=top)
