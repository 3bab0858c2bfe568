"""Replies to many chats at once: what the evaluate stage and `lora-flow generate` run, with transformers'
`generate`.

On a CPU a small model's decoding step costs nearly the same for 1 row as for 8: it reads every weight either
way. So the prompts go in large batches (eval.generate_batch_size), sorted by length so that rows of a batch
need little padding, and the prefix every prompt starts with (the system prompt, a tool list) is run once:
each batch continues from a copy of its key/value cache, its rows padded between the shared prefix and their
own tokens (the attention mask and the position ids skip the padding). `generate` decodes CHUNK tokens per
call and the rows that stopped leave the batch before the next call continues the others from their cache.
Greedy decoding of one prompt alone (`model.generate` on it, generate_one_by_one) gives the same replies to
float rounding: bench/eval_speed.py counts the replies that differ, and tests hold the served model to the
replies the evaluation wrote.
"""

from __future__ import annotations

import copy

from lora_core.progress import Progress

MIN_SHARED_PREFIX = 8  # tokens; below this the cache copies cost more than the prefix saves
CHUNK = 16  # new tokens per generate call; rows that stopped leave the batch between calls


def shared_prefix(rows: list[list[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one token of its own (the step that yields
    logits)."""
    limit = min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


class _StepCounter:
    """A transformers streamer that only counts decoding steps, for progress lines (every put after the
    prompt's is one new token per row)."""

    def __init__(self, progress: Progress, rows: int):
        self.progress, self.rows, self.prompt_seen = progress, rows, False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.progress.advance(self.rows)
        self.prompt_seen = True

    def end(self) -> None:
        pass


def encode_prompts(tokenizer, chats: list[tuple[list[dict], list | None]]) -> list[list[int]]:
    """Token ids of each chat rendered with its template up to the assistant's turn (the template writes any
    BOS)."""
    texts = [
        tokenizer.apply_chat_template(m, tools=t, add_generation_prompt=True, tokenize=False)
        for m, t in chats
    ]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def _batch_inputs(rows: list[list[int]], prefix: int, pad_id: int, device):
    """input_ids and attention_mask: the shared prefix, then padding, then each row's own tokens."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        own = len(r) - prefix
        ids[b, :prefix], ids[b, width - own :] = torch.tensor(r[:prefix]), torch.tensor(r[prefix:])
        mask[b, :prefix], mask[b, width - own :] = 1, 1
    return ids.to(device), mask.to(device)


def _even_batches(order: list[int], batch_size: int) -> list[list[int]]:
    """`order` cut into the fewest batches of at most `batch_size`, of even sizes (70 at 64: 35 + 35, not 64 +
    6)."""
    count = -(-len(order) // batch_size)
    size = -(-len(order) // count)
    return [order[i : i + size] for i in range(0, len(order), size)]


def _decode_in_chunks(
    model, ids, mask, *, past, settings, stops: list[int], pad_id: int, progress: Progress
) -> list[list[int]]:
    """Each row's new tokens up to and including its stop token. transformers' `generate` keeps a finished
    row in the batch until every row has stopped; decoding `CHUNK` tokens per call and continuing only the
    unfinished rows from their key/value cache (the documented way to continue a generation) spends the
    steps on rows still writing."""
    import torch

    rows = list(range(ids.shape[0]))
    tokens: list[list[int]] = [[] for _ in rows]
    left = settings.max_new_tokens
    while rows and left > 0:
        step = min(CHUNK, left)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            past_key_values=past,
            **{**settings.kwargs(), "max_new_tokens": step},
            pad_token_id=pad_id,
            eos_token_id=stops,
            return_dict_in_generate=True,
            streamer=_StepCounter(progress, len(rows)),
        )
        new = out.sequences[:, ids.shape[1] :].tolist()
        keep = []
        for b, (row, got) in enumerate(zip(rows, new)):
            end = next((j for j, t in enumerate(got) if t in stops), None)
            tokens[row] += got if end is None else got[: end + 1]
            if end is None and len(got) == step:
                keep.append(b)
        left -= step
        if not keep or left <= 0:
            break
        past = out.past_key_values
        past.batch_select_indices(torch.tensor(keep, device=ids.device))
        ids = out.sequences[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], out.sequences.shape[1] - mask.shape[1])], dim=1)[
            keep
        ]
        rows = [rows[b] for b in keep]
    return tokens


def generate_many(
    model,
    tokenizer,
    chats: list[tuple[list[dict], list | None]],
    *,
    settings,
    batch_size: int = 64,
    label: str = "replies",
    share_prefix: bool = True,
) -> list[str]:
    """Replies to `chats` ((messages, tools) each) in their order, decoded with `settings`
    (GenerationSettings)."""
    import torch

    from lora_core.formatting import stop_token_ids

    if not chats:
        return []
    rows = encode_prompts(tokenizer, chats)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    device = next(model.parameters()).device
    prefix = shared_prefix(rows) if share_prefix and len(rows) > 1 else 0
    prefix = prefix if prefix >= MIN_SHARED_PREFIX else 0
    stops = stop_token_ids(model, tokenizer)
    progress = Progress(label, len(rows) * settings.max_new_tokens, "tokens at most")
    replies: dict[int, str] = {}
    with torch.inference_mode():
        cache = None
        if prefix:
            cache = model(
                input_ids=torch.tensor([rows[0][:prefix]], device=device), use_cache=True
            ).past_key_values
        for index in _even_batches(order, batch_size):
            ids, mask = _batch_inputs([rows[i] for i in index], prefix, tokenizer.pad_token_id, device)
            past = None
            if cache is not None:
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(len(index))
            new = _decode_in_chunks(
                model,
                ids,
                mask,
                past=past,
                settings=settings,
                stops=stops,
                pad_id=tokenizer.pad_token_id,
                progress=progress,
            )
            for i, row in zip(index, new):
                replies[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    progress.finish()
    return [replies[i] for i in range(len(rows))]


def generate_one_by_one(model, tokenizer, chats: list[tuple[list[dict], list | None]], settings) -> list[str]:
    """The straightforward reference: one prompt at a time through `model.generate`, the same stop tokens and
    settings, as a hand-written script does. Tests and bench/eval_speed.py hold generate_many to it."""
    import torch

    from lora_core.formatting import stop_token_ids

    stops, replies = stop_token_ids(model, tokenizer), []
    for prompt in encode_prompts(tokenizer, chats):
        ids = torch.tensor([prompt], device=next(model.parameters()).device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                **settings.kwargs(),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stops,
            )
        replies.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return replies
