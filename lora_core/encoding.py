"""Encoding many records at once: chat-template renders and tokenization in batches, loss masks from offsets.

The mask rule is formatting.py's: for assistant message i, the characters between render(messages[:i],
add_generation_prompt=True) and render(messages[:i+1]) are that reply plus its end-of-turn token; tokens whose
first character falls inside such a span are trained on. Done a batch at a time it costs one render per
conversation plus one per reply (the rendering up to a reply that ends the conversation is the full one), and
one batched call of the tokenizer: per record ~0.2 ms for a short system/user/assistant chat on one core,
about what a plain `apply_chat_template(..., tokenize=True)` costs (docs/speed.md, "Data at size").
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

from lora_core.errors import LoraFlowError


class FormatError(LoraFlowError):
    """A conversation cannot be rendered with this tokenizer's chat template."""


NO_TEMPLATE = (
    "the base tokenizer has no chat template (GGUF files often carry none); set template.chat_template to a "
    "Jinja chat-template file for this model family, or use a 'text' dataset"
)


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    assistant_masks: list[int]  # 1 where the token is trained on


def render_many(tokenizer, jobs: list[tuple[list[dict], list | None, bool]]) -> list[str]:
    """Each (messages, tools, add_generation_prompt) rendered with the chat template: the ones without
    tools in one apply_chat_template call per add_generation_prompt value (it takes one tools list for a
    whole batch)."""
    out: list[str | None] = [None] * len(jobs)
    for gen in (False, True):
        batch = [i for i, (_, tools, g) in enumerate(jobs) if g is gen and not tools]
        if batch:
            texts = tokenizer.apply_chat_template(
                [jobs[i][0] for i in batch], tokenize=False, add_generation_prompt=gen
            )
            for i, text in zip(batch, texts):
                out[i] = text
    for i, (messages, tools, gen) in enumerate(jobs):
        if tools:
            out[i] = tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=gen
            )
    return out  # type: ignore[return-value]


def _spans(messages: list[dict], full: str, rendered: dict) -> list[tuple[int, int]]:
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = rendered[(i, True)], rendered.get((i + 1, False), full)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise FormatError(
                f"the chat template renders message {i} differently depending on what follows it, so the "
                "assistant tokens cannot be located; use a template that renders conversations as prefixes "
                "of each other, or set template.assistant_only_loss=false"
            )
        reply = upto[len(before) :]
        # a newline after end-of-turn is no target
        spans.append((len(before), len(before) + len(reply.rstrip())))
    return spans


def conversation_spans(tokenizer, conversations: list[tuple[list[dict], list | None]]) -> list:
    """For each (messages, tools): (full rendering, character spans of each assistant reply with its
    end-of-turn), or the FormatError that conversation raises."""
    jobs: list[tuple[list[dict], list | None, bool]] = []
    # where[c]: (prefix length, add_generation_prompt) -> index into jobs
    where: list[dict[tuple[int, bool], int]] = []
    for messages, tools in conversations:
        at = {(len(messages), False): len(jobs)}
        jobs.append((messages, tools, False))
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                for key in ((i, True), (i + 1, False)):
                    if key not in at:
                        at[key] = len(jobs)
                        jobs.append((messages[: key[0]], tools, key[1]))
        where.append(at)
    texts = render_many(tokenizer, jobs)
    out: list[tuple[str, list[tuple[int, int]]] | FormatError] = []
    for (messages, _), at in zip(conversations, where):
        rendered = {key: texts[j] for key, j in at.items()}
        full = rendered[(len(messages), False)]
        try:
            out.append((full, _spans(messages, full, rendered)))
        except FormatError as exc:
            out.append(exc)
    return out


def _mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose first character lies in a span (token starts never decrease)."""
    starts = [start for start, _ in offsets]
    mask = [0] * len(starts)
    for a, b in spans:
        lo, hi = bisect_left(starts, a), bisect_left(starts, b)
        mask[lo:hi] = [1] * (hi - lo)
    return mask


def _tokenize(tokenizer, texts: list[str], *, offsets: bool) -> dict[str, list]:
    """input_ids (and offset_mapping) of each text, without added special tokens: a fast tokenizer's
    backend encodes the batch directly (what tokenizer(texts) does, less its conversion of every encoding
    to dicts: ~50 us a record)."""
    if not texts:
        return {"input_ids": [], "offset_mapping": []}
    if not getattr(tokenizer, "is_fast", False):
        return tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return {
        "input_ids": [e.ids for e in encodings],
        "offset_mapping": [e.offsets for e in encodings] if offsets else [],
    }


def encode_conversations(
    tokenizer, conversations: list[tuple[list[dict], list | None]], assistant_only: bool = True
) -> list[Encoded | FormatError]:
    """Each (messages, tools) encoded with its loss mask, or the FormatError it raises."""
    if not tokenizer.chat_template:
        return [FormatError(NO_TEMPLATE) for _ in conversations]
    rendered = conversation_spans(tokenizer, conversations)
    ok = [r for r in rendered if not isinstance(r, FormatError)]
    enc = _tokenize(tokenizer, [full for full, _ in ok], offsets=assistant_only)
    out: list[Encoded | FormatError] = []
    j = 0
    for r in rendered:
        if isinstance(r, FormatError):
            out.append(r)
            continue
        ids = enc["input_ids"][j]
        if not assistant_only:
            out.append(Encoded(ids, [1] * len(ids)))
        else:
            mask = _mask(enc["offset_mapping"][j], r[1])
            no_target = FormatError(
                "no assistant tokens after rendering; the conversation would teach nothing"
            )
            out.append(Encoded(ids, mask) if any(mask) else no_target)
        j += 1
    return out


def encode_text(tokenizer, text: str) -> Encoded:
    """Plain-text records: every token is a target, and the text ends with EOS so the model learns to stop."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return Encoded(ids, [1] * len(ids))


def encode_records(
    tokenizer, records: list[dict], assistant_only: bool = True
) -> list[Encoded | FormatError]:
    """Each record ({"messages", "tools"?} or {"text"}) encoded, or the FormatError it raises."""
    chats = [i for i, r in enumerate(records) if "text" not in r]
    encoded = encode_conversations(
        tokenizer, [(records[i]["messages"], records[i].get("tools")) for i in chats], assistant_only
    )
    out: list[Encoded | FormatError | None] = [None] * len(records)
    for i, e in zip(chats, encoded):
        out[i] = e
    for i, r in enumerate(records):
        if "text" in r:
            out[i] = encode_text(tokenizer, r["text"])
    return out  # type: ignore[return-value]
