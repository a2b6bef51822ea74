"""selfadapt gateway: OpenAI-compatible API over vLLM with per-request LoRA adapters."""

__version__ = "0.1.0"
