from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from lora_core.base_model import BaseModelRef, resolve_base
from lora_core.config import ModelConfig
from tasks.cache import RETRY_OPTIONS, TIMEOUTS


# Not cached: resolving *is* computing the identity (content hash / hub commit) other keys use.
@task(
    name="resolve-base-model",
    cache_policy=NO_CACHE,
    timeout_seconds=TIMEOUTS["resolve-base-model"],
    **RETRY_OPTIONS,
)
def resolve_base_model(cfg: ModelConfig, cache_dir: str) -> BaseModelRef:
    """Embedded GGUF -> cached safetensors, local directory, or hub snapshot."""
    return resolve_base(cfg, cache_dir)
