"""Chat-template formatting with an assistant-token loss mask.

Many chat templates (SmolLM2's ChatML among them) have no `{% generation %}` markers, so
`apply_chat_template(..., return_assistant_tokens_mask=True)` returns an all-zero mask.
We derive the mask from the template itself, for any template: for assistant message i,
the characters between render(messages[:i], add_generation_prompt=True) and
render(messages[:i+1]) are that reply plus its end-of-turn token. Tokens whose first
character falls inside such a span are trained on. A template whose renderings are not
prefixes of each other (e.g. one that drops earlier reasoning) is refused, not guessed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lora_core.errors import LoraFlowError

log = logging.getLogger(__name__)


class FormatError(LoraFlowError):
    """A conversation cannot be rendered with this tokenizer's chat template."""


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    assistant_masks: list[int]  # 1 where the token is trained on


def _render(tokenizer, messages, tools, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(tokenizer, messages: list[dict], tools: list | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the character spans of each assistant reply (with its end-of-turn)."""
    full = _render(tokenizer, messages, tools)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], tools, add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], tools)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise FormatError(
                f"the chat template renders message {i} differently depending on what follows it, so the "
                "assistant tokens cannot be located; use a template that renders conversations as prefixes "
                "of each other, or set format.assistant_only_loss=false"
            )
        reply = upto[len(before):]
        end = len(before) + len(reply.rstrip())  # trailing newline after end-of-turn is not a target
        spans.append((len(before), end))
    return full, spans


def encode_conversation(tokenizer, messages: list[dict], tools: list | None = None, assistant_only: bool = True) -> Encoded:
    if not tokenizer.chat_template:
        raise FormatError("the base tokenizer has no chat template; use a chat model, or a 'text' dataset")
    full, spans = assistant_spans(tokenizer, messages, tools)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if not assistant_only:
        return Encoded(ids, [1] * len(ids))
    mask = [0] * len(ids)
    s = 0
    for t, (start, _end) in enumerate(enc["offset_mapping"]):
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s < len(spans) and spans[s][0] <= start < spans[s][1]:
            mask[t] = 1
    if not any(mask):
        raise FormatError("no assistant tokens after rendering; the conversation would teach nothing")
    return Encoded(ids, mask)


def encode_text(tokenizer, text: str) -> Encoded:
    """Plain-text records: every token is a target, and the text ends with EOS so the model learns to stop."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return Encoded(ids, [1] * len(ids))


def encode_record(tokenizer, record: dict, assistant_only: bool = True) -> Encoded:
    if "text" in record:
        return encode_text(tokenizer, record["text"])
    return encode_conversation(tokenizer, record["messages"], record.get("tools"), assistant_only)


def check_end_of_turn_trained(tokenizer, encoded: Encoded) -> None:
    """The token that closes an assistant turn must be a target, or the tuned model never learns to stop."""
    eos = tokenizer.eos_token_id
    last_trained = [encoded.input_ids[i] for i in range(len(encoded.input_ids)) if encoded.assistant_masks[i]
                    and (i + 1 == len(encoded.input_ids) or not encoded.assistant_masks[i + 1])]
    if eos is not None and eos not in last_trained:
        raise FormatError(
            f"the end-of-turn token {tokenizer.eos_token!r} is not inside the assistant loss mask; "
            "the tuned model would not learn to stop (check the tokenizer's eos_token and chat template)"
        )


def prompt_messages(messages: list[dict]) -> tuple[list[dict], str]:
    """Everything before the first assistant reply, and that reply (for side-by-side samples)."""
    i = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:i], messages[i]["content"]


# --------------------------------------------------------------------------- stage


@dataclass(frozen=True)
class FormatResult:
    dataset_dir: str  # datasets.save_to_disk: input_ids, assistant_masks, key, source, record
    tokenizer_dir: str  # the tokenizer used, with its (possibly replaced) chat template
    n_rows: int
    max_tokens: int


def format_dataset(records_path: str, val_records_path: str | None, tokenizer_path: str, cfg, out_dir, trust_remote_code: bool = False) -> FormatResult:
    """Render every conversation with the base tokenizer's chat template and build its loss mask."""
    import json
    from pathlib import Path

    import datasets

    from lora_core.base_model import load_tokenizer
    from lora_core.data import inject_system_prompt, read_jsonl, record_key

    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
    if cfg.chat_template:
        template = Path(cfg.chat_template)
        if not template.is_file():
            raise FormatError(f"template.chat_template {cfg.chat_template!r}: no such file; point it at a .jinja chat template")
        tokenizer.chat_template = template.read_text()
    columns: dict[str, list] = {"input_ids": [], "assistant_masks": [], "key": [], "source": [], "record": []}
    problems = []
    sources = [("train", records_path)] + ([("val", val_records_path)] if val_records_path else [])
    checked_eot = False
    for source, path in sources:
        records = inject_system_prompt(read_jsonl(path), cfg.system_prompt)
        for i, rec in enumerate(records):
            try:
                enc = encode_record(tokenizer, rec, cfg.assistant_only_loss)
                if cfg.assistant_only_loss and "messages" in rec and not checked_eot:
                    check_end_of_turn_trained(tokenizer, enc)
                    checked_eot = True
            except FormatError as exc:
                problems.append(f"{source} record {i}: {exc}")
                continue
            columns["input_ids"].append(enc.input_ids)
            columns["assistant_masks"].append(enc.assistant_masks)
            columns["key"].append(record_key(rec))
            columns["source"].append(source)
            columns["record"].append(json.dumps(rec, ensure_ascii=False))
    if problems:
        raise FormatError("\n".join(problems[:20]))
    ds = datasets.Dataset.from_dict(columns)
    ds.save_to_disk(str(Path(out_dir) / "formatted"))
    tokenizer.save_pretrained(str(Path(out_dir) / "tokenizer"))
    return FormatResult(str(Path(out_dir) / "formatted"), str(Path(out_dir) / "tokenizer"), len(ds), max(len(x) for x in columns["input_ids"]))
