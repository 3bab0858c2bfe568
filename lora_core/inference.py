"""Load a tuned model (adapter folder, MLflow transformers-flavor folder, or merged model) and reply to
chats."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lora_core.base_model import GENERATION_CONFIG, load_model, load_tokenizer, pick_device
from lora_core.errors import LoraFlowError
from lora_core.formatting import stop_token_ids

log = logging.getLogger(__name__)


class InferenceError(LoraFlowError):
    """The model to load is not where or what it should be."""


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0

    def kwargs(self) -> dict:
        if self.temperature <= 0:
            return {
                "do_sample": False,
                "max_new_tokens": self.max_new_tokens,
                "repetition_penalty": self.repetition_penalty,
            }
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
        }


def write_generation_defaults(folder: str | Path, settings: GenerationSettings) -> None:
    """Write `settings` as the defaults of `folder`'s generation_config.json (kept: its stop tokens), so
    that a plain transformers `generate()` on the folder decodes as the evaluation did: greedy unless asked
    to sample."""
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(folder)
    sample = settings.temperature > 0
    gen.update(
        do_sample=sample,
        max_new_tokens=settings.max_new_tokens,
        repetition_penalty=settings.repetition_penalty,
        temperature=settings.temperature if sample else None,
        top_p=settings.top_p if sample else None,
        top_k=settings.top_k if sample else None,
    )
    gen.save_pretrained(folder)


def generation_defaults(folder: str | Path) -> dict:
    """The GenerationSettings fields a model folder's generation_config.json sets (write_generation_defaults),
    or {}."""
    from lora_core.base_model import GENERATION_CONFIG

    path = Path(folder) / GENERATION_CONFIG
    if not path.is_file():
        return {}
    gen = json.loads(path.read_text())
    out = {k: gen[k] for k in ("max_new_tokens", "repetition_penalty") if gen.get(k) is not None}
    if gen.get("do_sample"):
        out.update({k: gen[k] for k in ("temperature", "top_p", "top_k") if gen.get(k) is not None})
    elif "do_sample" in gen:
        out["temperature"] = 0.0
    return out


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def load_chat_model(
    path: str | Path, base_path: str | None = None, device: str = "auto", trust_remote_code: bool = False
):
    """(model, tokenizer) from a peft adapter folder (base from `base_path` or the adapter's config),
    an MLflow transformers-flavor model folder (peft/ + components/tokenizer), or a full model folder."""
    import torch
    from peft import PeftModel

    path = Path(path)
    device = pick_device(device)
    if (path / "peft" / "adapter_config.json").is_file():  # downloaded MLflow model version
        adapter, tok_dir = path / "peft", path / "components" / "tokenizer"
    elif (path / "adapter_config.json").is_file():
        adapter, tok_dir = path, path
    elif (path / "config.json").is_file():
        return load_model(str(path), torch.float32, device, trust_remote_code).eval(), load_tokenizer(
            str(path), trust_remote_code
        )
    else:
        raise InferenceError(
            f"{path}: neither an adapter (adapter_config.json) nor a model (config.json); pass an adapter or "
            "merged-model folder"
        )
    base = base_path or json.loads((adapter / "adapter_config.json").read_text()).get(
        "base_model_name_or_path"
    )
    if not base or not (Path(base) / "config.json").is_file():
        raise InferenceError(
            f"{adapter}: its base model {base!r} is not available locally; pass --base-model DIR"
        )
    tokenizer = load_tokenizer(str(tok_dir if _has_tokenizer(tok_dir) else base), trust_remote_code)
    base_model = load_model(base, torch.float32, device, trust_remote_code)
    if (
        adapter / GENERATION_CONFIG
    ).is_file():  # the adapter's stop tokens (with the end-of-turn token), not the base's
        from transformers import GenerationConfig

        base_model.generation_config = GenerationConfig.from_pretrained(adapter)
    model = PeftModel.from_pretrained(base_model, str(adapter))
    return model.eval(), tokenizer


def _inputs(model, tokenizer, messages: list[dict]):
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in enc.items()}


def reply(
    model,
    tokenizer,
    messages: list[dict],
    settings: GenerationSettings = GenerationSettings(),
    tools: list | None = None,
) -> str:
    return reply_batch(model, tokenizer, [(messages, tools)], settings)[0]


def reply_batch(
    model,
    tokenizer,
    chats: list[tuple[list[dict], list | None]],
    settings: GenerationSettings = GenerationSettings(),
    batch_size: int = 64,
) -> list[str]:
    """Replies to several chats, `batch_size` per generate call, as the evaluate stage generates them
    (lora_core/generation.py: length-sorted batches, the shared prefix run once)."""
    from lora_core.generation import generate_many

    return generate_many(model, tokenizer, chats, settings=settings, batch_size=batch_size)


def stream_reply(
    model, tokenizer, messages: list[dict], settings: GenerationSettings = GenerationSettings()
) -> Iterator[str]:
    """Yields the reply as it is generated (transformers' TextIteratorStreamer on a worker thread)."""
    import threading

    import torch
    from transformers import TextIteratorStreamer

    enc = _inputs(model, tokenizer, messages)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stops = stop_token_ids(model, tokenizer)

    def work():
        with torch.inference_mode():
            model.generate(
                **enc,
                **settings.kwargs(),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stops,
                streamer=streamer,
            )

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    yield from streamer
    thread.join()


def read_prompts(path: str | Path) -> list[list[dict]]:
    """Prompts from JSONL/JSON: {"prompt": "..."} or {"messages": [...]} per record, or plain strings."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        records = (
            json.loads(text)
            if path.suffix == ".json"
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except json.JSONDecodeError as exc:
        raise InferenceError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); fix the file") from None
    chats = []
    for i, r in enumerate(records):
        if isinstance(r, str):
            chats.append([{"role": "user", "content": r}])
        elif isinstance(r, dict) and isinstance(r.get("messages"), list):
            chats.append(r["messages"])
        elif isinstance(r, dict) and isinstance(r.get("prompt"), str):
            chats.append([{"role": "user", "content": r["prompt"]}])
        else:
            raise InferenceError(
                f'{path} record {i}: expected a string, {{"prompt": ...}} or {{"messages": [...]}}'
            )
    return chats
