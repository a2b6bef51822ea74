"""Learning pipeline: background tasks that turn documents into LoRA adapters."""
