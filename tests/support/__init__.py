"""Helpers shared by test modules (real models, cached adapters)."""
