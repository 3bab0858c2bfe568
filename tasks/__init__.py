"""Thin Prefect tasks over lora_core: where, whether and how each stage runs (cache, retries, output
folder)."""
