"""LoRA training (heavy imports live in the modules, loaded lazily)."""
