"""Inference backends: the engine protocol and its in-process vLLM implementation."""
