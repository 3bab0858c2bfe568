"""Chat-template formatting with an assistant-token loss mask.

Many chat templates (SmolLM2's ChatML among them) have no `{% generation %}` markers, so
`apply_chat_template(..., return_assistant_tokens_mask=True)` returns an all-zero mask.
We derive the mask from the template itself, for any template: for assistant message i,
the characters between render(messages[:i], add_generation_prompt=True) and
render(messages[:i+1]) are that reply plus its end-of-turn token. Tokens whose first
character falls inside such a span are trained on. A template whose renderings are not
prefixes of each other (e.g. one that drops earlier reasoning) is refused, not guessed.

The token that closes an assistant turn is not always the tokenizer's eos_token (`<|im_end|>` in ChatML,
`<end_of_turn>` in Gemma, `<|eot_id|>` in Llama 3). It is read from the template the same way: render an
exchange with a known reply and take the special token written right after it, unless `template.end_of_turn`
names it. It is a target at the end of every reply, and a stop token of every later generation
(generation_config.json beside the saved tokenizer, then in the adapter and merged-model folders).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lora_core.encoding import (
    NO_TEMPLATE,
    Encoded,
    FormatError,
    encode_conversations,
    encode_records,
    encode_text,  # noqa: F401 - public here too
)

log = logging.getLogger(__name__)


def _render(tokenizer, messages, tools, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _one(encoded: Encoded | FormatError) -> Encoded:
    if isinstance(encoded, FormatError):
        raise encoded
    return encoded


def encode_conversation(
    tokenizer, messages: list[dict], tools: list | None = None, assistant_only: bool = True
) -> Encoded:
    return _one(encode_conversations(tokenizer, [(messages, tools)], assistant_only)[0])


def encode_record(tokenizer, record: dict, assistant_only: bool = True) -> Encoded:
    return _one(encode_records(tokenizer, [record], assistant_only)[0])


PROBE = [{"role": "user", "content": "Probe question?"}, {"role": "assistant", "content": "Probe reply 42."}]


def special_tokens(tokenizer) -> set[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    return set(tokenizer.all_special_tokens) | {t.content for t in added if t.special}


def token_after_reply(tokenizer) -> str | None:
    """The special token the chat template writes right after an assistant reply (whitespace skipped), or
    None. Raises jinja2's TemplateError when the template cannot render a user/assistant exchange."""
    reply = PROBE[-1]["content"]
    text = _render(tokenizer, PROBE, None)
    at = text.rfind(reply)
    if at < 0:
        return None
    ids = tokenizer(text[at + len(reply) :].lstrip(), add_special_tokens=False)["input_ids"]
    token = tokenizer.convert_ids_to_tokens(ids[0]) if ids else None
    return token if token in special_tokens(tokenizer) else None


def end_of_turn(tokenizer, override: str | None = None) -> str:
    """The token that closes an assistant turn: `override` (template.end_of_turn), checked against the
    vocabulary, else the one the chat template writes after a reply. A FormatError of one line, with the
    fix, when neither works."""
    from jinja2 import TemplateError

    if override is not None:
        if override not in tokenizer.get_vocab():
            raise FormatError(
                f"template.end_of_turn {override!r} is not a token of the base tokenizer's vocabulary; set "
                "it "
                "to the token that closes an assistant turn (e.g. '<|im_end|>', '<end_of_turn>', "
                "'<|eot_id|>')"
            )
        return override
    if not tokenizer.chat_template:
        raise FormatError(NO_TEMPLATE)
    try:
        token = token_after_reply(tokenizer)
    except TemplateError as exc:
        raise FormatError(
            f"the chat template cannot render a user/assistant exchange ({exc}); fix it or set "
            "template.chat_template to one that can"
        ) from None
    if token is None:
        raise FormatError(
            "the chat template writes no special token right after an assistant reply, so the token that "
            "ends a "
            "turn is unknown; set template.end_of_turn to it (e.g. '<|im_end|>', '<end_of_turn>', "
            "'<|eot_id|>')"
        )
    return token


def check_end_of_turn_trained(tokenizer, encoded: Encoded, end_of_turn_id: int | None = None) -> None:
    """Every trained run of tokens (a reply) must end with the end-of-turn token, or the tuned model never
    learns to stop. `end_of_turn_id` defaults to the one the chat template writes (end_of_turn)."""
    eot = (
        tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer)) if end_of_turn_id is None else end_of_turn_id
    )
    ids, mask = encoded.input_ids, encoded.assistant_masks
    run_ends = [ids[i] for i in range(len(ids)) if mask[i] and (i + 1 == len(ids) or not mask[i + 1])]
    if not run_ends or any(t != eot for t in run_ends):
        raise FormatError(
            f"the end-of-turn token {tokenizer.convert_ids_to_tokens(eot)!r} does not close every assistant "
            "reply inside the "
            "loss mask, so the tuned model would not learn to stop; set template.end_of_turn to the token "
            "the chat "
            "template writes after a reply"
        )


@dataclass(frozen=True)
class EndOfTurnOdds:
    taught: list[int]  # the stop tokens the rows train on, commonest (the end-of-turn token) first
    prob: float  # the model's median probability of taught[0] where it ends a reply
    rank: int  # its median rank there (1 = likeliest) ...
    vocab: int  # ... of this many tokens
    replies: int  # reply ends measured


def end_of_turn_odds(
    model,
    tokenizer,
    *,
    input_ids: list[list[int]],
    assistant_masks: list[list[int]],
    max_length: int,
    rows: int = 16,
) -> EndOfTurnOdds | None:
    """How likely `model` finds the token that ends the replies of encoded rows (cut to `max_length`),
    measured in one no-grad forward of the first `rows` rows that have one; None when no row trains on a
    stop token. The stop tokens are inference.stop_token_ids'; a reply ends where one is a target (each
    reply's mask closes with the end-of-turn token, a text record with eos)."""
    import statistics
    from collections import Counter

    import torch

    stops = set(stop_token_ids(model, tokenizer))
    ends = [
        [t for t, i in enumerate(ids[:max_length]) if t > 0 and i in stops and masks[t]]
        for ids, masks in zip(input_ids, assistant_masks)
    ]
    taught = [
        token for token, _ in Counter(ids[t] for ids, at in zip(input_ids, ends) for t in at).most_common()
    ]
    if not taught:
        return None
    # each cut after its last reply end, with a mask of 1 exactly at its end-of-turn targets
    sample: list[dict[str, list[int]]] = []
    for ids, at in zip(input_ids, ends):
        at = [t for t in at if ids[t] == taught[0]]
        if at and len(sample) < rows:
            sample.append(
                {"input_ids": ids[: at[-1] + 1], "assistant_masks": [int(t in at) for t in range(at[-1] + 1)]}
            )
    # right-padded: a causal model's logits unchanged
    ids, attn, _, labels = pad_batch(sample, tokenizer.pad_token_id)
    keep = torch.zeros_like(attn, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100  # the positions predicting an end-of-turn token
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(
            input_ids=ids.to(device), attention_mask=attn.to(device), logits_to_keep=keep.to(device)
        ).logits.float()
    eot = logits[:, taught[0]]
    return EndOfTurnOdds(
        taught,
        statistics.median(logits.softmax(-1)[:, taught[0]].tolist()),
        statistics.median_low((logits > eot[:, None]).sum(-1).add(1).tolist()),
        logits.shape[-1],
        len(logits),
    )


# Median probability under which the base is taken never to predict the end-of-turn token: a loss above
# ln(1e4) = 9.2 nats on the one token that closes every reply, worse than a uniform guess over 10,000 tokens.
# Measured at the ends of the tutoring replies: SmolLM2-135M-Instruct gives its <|im_end|> 0.15 (median rank
# 2); Gemma 3 270M gives its <end_of_turn> 1.1e-11 (rank 256,693 of 262,144: its row sits by an unused
# token's), which a short LoRA run did not lift.
UNLEARNT_PROB = 1e-4


def check_base_predicts_end_of_turn(
    model, tokenizer, train_ds, max_length: int, *, rows_trained: bool
) -> EndOfTurnOdds | None:
    """The train stage's check, before training: the base's EndOfTurnOdds on the first 16 training rows,
    logged; below UNLEARNT_PROB one warning with the fix, unless the token's rows are trained anyway
    (`rows_trained`: lora.train_end_of_turn, or full fine-tuning). One no-grad forward: 22 s for Gemma 3
    270M on 2 busy CPU cores, where its training steps (8 conversations) took 9-12 s."""
    odds = end_of_turn_odds(
        model,
        tokenizer,
        input_ids=train_ds["input_ids"],
        assistant_masks=train_ds["assistant_masks"],
        max_length=max_length,
    )
    if odds is None:
        return None
    token = tokenizer.convert_ids_to_tokens(odds.taught[0])
    if odds.prob >= UNLEARNT_PROB or rows_trained:
        log.info(
            "end of turn: the base gives %r a median probability of %.2g (rank %d) where %d training replies "
            "end%s",
            token,
            odds.prob,
            odds.rank,
            odds.replies,
            "; its rows are trained" if rows_trained else "",
        )
    else:
        log.warning(
            "the base model never predicts the end-of-turn token %r where training replies end (median "
            "probability "
            "%.1e, rank %d of %d, over %d replies): LoRA alone may not teach it to stop and replies can run "
            "to the "
            "token limit; set lora.train_end_of_turn=true to train that token's embedding and LM-head rows",
            token,
            odds.prob,
            odds.rank,
            odds.vocab,
            odds.replies,
        )
    return odds


def prompt_messages(messages: list[dict]) -> tuple[list[dict], str]:
    """Everything before the first assistant reply, and that reply (for side-by-side samples)."""
    i = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:i], messages[i]["content"]


# --------------------------------------------------------------------------- stage


@dataclass(frozen=True)
class FormatResult:
    dataset_dir: str  # datasets.save_to_disk: input_ids, assistant_masks, key, source, record
    tokenizer_dir: (
        str  # the tokenizer used, with its (possibly replaced) chat template and generation_config.json
    )
    n_rows: int
    max_tokens: int
    end_of_turn: str | None = None  # the token that closes an assistant turn (None: no conversations)


def with_default_system_prompt(template: str, system_prompt: str) -> str:
    """The chat template with `system_prompt` as the system message of any conversation that has none:
    a chat renders exactly as the training data did (template.system_prompt injected), and a request
    that brings its own system message keeps it."""
    import json

    # a JSON string literal is a valid Jinja string literal (same escapes)
    head = (
        "{%- if messages and messages[0]['role'] != 'system' -%}"
        f"{{%- set messages = [{{'role': 'system', 'content': {json.dumps(system_prompt)}}}] + messages -%}}"
        "{%- endif -%}\n"
    )
    return head + template


COLUMNS = ("input_ids", "assistant_masks", "key", "source", "record")  # of the saved dataset, in this order


def _features():
    import datasets

    # what Dataset.from_dict chose: the saved rows unchanged
    ints = {"input_ids": "int32", "assistant_masks": "int64"}
    return datasets.Features(
        {
            name: datasets.Sequence(datasets.Value(ints[name])) if name in ints else datasets.Value("string")
            for name in COLUMNS + ("problem",)
        }
    )


def _format_batch(batch: dict, tokenizer, system_prompt: str | None, assistant_only: bool) -> dict:
    """A batch of records JSONL lines encoded (source, line, index -> COLUMNS and the problem, if any)."""
    import json

    from lora_core.records import inject_system_prompt, record_key

    records = inject_system_prompt([json.loads(line) for line in batch["line"]], system_prompt)
    out: dict[str, list] = {name: [] for name in COLUMNS + ("problem",)}
    for source, i, rec, enc in zip(
        batch["source"], batch["index"], records, encode_records(tokenizer, records, assistant_only)
    ):
        bad = isinstance(enc, FormatError)
        out["input_ids"].append([] if isinstance(enc, FormatError) else enc.input_ids)
        out["assistant_masks"].append([] if isinstance(enc, FormatError) else enc.assistant_masks)
        out["key"].append(record_key(rec))
        out["source"].append(source)
        out["record"].append(json.dumps(rec, ensure_ascii=False))
        out["problem"].append(f"{source} record {i}: {enc}" if bad else None)
    return out


def _first_record(path: str) -> dict | None:
    import json

    with open(path, encoding="utf-8") as f:
        line = f.readline()
    return json.loads(line) if line.strip() else None


def _check_template(tokenizer, records_path: str, cfg) -> tuple[str | None, int | None]:
    """The end-of-turn token and its id (None for text records without template.end_of_turn), raised as one
    line before any record is encoded when the template cannot end a turn; checked against the first
    record's mask, once (a property of the template)."""
    from lora_core.records import inject_system_prompt

    first = _first_record(records_path)
    chats = first is not None and "messages" in first  # every record of a run has one kind: chats or text
    if not (cfg.end_of_turn or chats):
        return None, None
    eot = end_of_turn(tokenizer, cfg.end_of_turn)
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    log.info(
        "end of turn: %r (id %d), %s",
        eot,
        eot_id,
        "template.end_of_turn" if cfg.end_of_turn else "from the chat template",
    )
    if chats and cfg.assistant_only_loss:
        assert first is not None  # chats: the first record has messages
        enc = encode_records(tokenizer, inject_system_prompt([first], cfg.system_prompt))[0]
        if not isinstance(enc, FormatError):  # a record that cannot be encoded is reported with the others
            check_end_of_turn_trained(tokenizer, enc, eot_id)
    return eot, eot_id


def _encoded(sources: list[tuple[str, str]], tokenizer, cfg, work):
    """Every records JSONL line (source "train" or "val") encoded by a batched datasets map over Arrow
    files in `work`, with progress for big inputs; the dataset has COLUMNS and "problem"."""
    import time

    import datasets

    from lora_core.streaming import BATCH, progress, workers, write_arrow

    started = time.monotonic()
    lines = datasets.Dataset.from_file(write_arrow(sources, work / "lines.arrow"))
    with progress(len(lines)):
        ds = lines.map(
            _format_batch,
            batched=True,
            batch_size=BATCH,
            num_proc=workers(len(lines)),
            remove_columns=lines.column_names,
            features=_features(),
            desc="formatting",
            fn_kwargs={
                "tokenizer": tokenizer,
                "system_prompt": cfg.system_prompt,
                "assistant_only": cfg.assistant_only_loss,
            },
            cache_file_name=str(work / "formatted.arrow"),
            new_fingerprint="formatted",
        )
    seconds = time.monotonic() - started
    log.info(
        "formatted %d records in %.1f s (%.0f records/s)", len(ds), seconds, len(ds) / max(seconds, 1e-9)
    )
    return ds


def format_dataset(
    records_path: str,
    *,
    val_records_path: str | None,
    tokenizer_path: str,
    cfg,
    out_dir,
    trust_remote_code: bool = False,
) -> FormatResult:
    """Render every conversation with the base tokenizer's chat template and build its loss mask, a batch
    at a time through Arrow files (memory stays flat in the number of records). Problems of the model (no
    chat template, unknown end-of-turn token) are one line, raised before any record is encoded; problems
    of records are listed by record, at most 20."""
    import tempfile
    from pathlib import Path

    import pyarrow.compute as pc

    from lora_core.base_model import load_tokenizer, save_generation_config
    from lora_core.streaming import first_values

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
    if cfg.chat_template:
        template = Path(cfg.chat_template)
        if not template.is_file():
            raise FormatError(
                f"template.chat_template {cfg.chat_template!r}: no such file; point it at a .jinja chat "
                "template"
            )
        tokenizer.chat_template = template.read_text()
    eot, eot_id = _check_template(tokenizer, records_path, cfg)
    sources = [("train", records_path)] + ([("val", val_records_path)] if val_records_path else [])
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".arrow-") as work:
        ds = _encoded(sources, tokenizer, cfg, Path(work))
        problems = first_values(ds, "problem", 20)
        if problems:
            raise FormatError("\n".join(problems))
        ds.select_columns(list(COLUMNS)).save_to_disk(str(out_dir / "formatted"))
        n_rows, max_tokens = len(ds), pc.max(pc.list_value_length(ds.data.column("input_ids"))).as_py()
    if cfg.system_prompt:  # what was trained on is what every saved model folder and registry version serves
        tokenizer.chat_template = with_default_system_prompt(tokenizer.chat_template, cfg.system_prompt)
    tokenizer_dir = out_dir / "tokenizer"
    tokenizer.save_pretrained(str(tokenizer_dir))
    if eot_id is not None:
        save_generation_config(tokenizer_path, [eot_id], tokenizer_dir, trust_remote_code)
    return FormatResult(str(out_dir / "formatted"), str(tokenizer_dir), n_rows, max_tokens, eot)


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a reply: the model's generation-config eos ids, those of a generation_config.json
    saved beside the tokenizer (formatting writes one with the end-of-turn token), and the end-of-turn
    token of the chat template."""
    from jinja2 import TemplateError
    from transformers import GenerationConfig

    from lora_core.base_model import GENERATION_CONFIG

    ids: list[int] = []

    def add(eos):
        ids.extend(i for i in ([eos] if isinstance(eos, int) else eos or []) if i not in ids)

    add(model.generation_config.eos_token_id)
    beside = Path(str(tokenizer.name_or_path))
    if (beside / GENERATION_CONFIG).is_file():
        add(GenerationConfig.from_pretrained(beside).eos_token_id)
    if tokenizer.chat_template:
        try:
            token = token_after_reply(tokenizer)
        except TemplateError:  # a template that cannot render a bare exchange: the saved stop tokens only
            token = None
        if token is not None:
            add(tokenizer.convert_tokens_to_ids(token))
    return ids or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def pad_batch(rows: list[dict], pad_id: int, padding_side: str = "right"):
    """input_ids / attention_mask / position_ids / labels tensors for a list of encoded rows."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[b, sl] = torch.tensor(r["input_ids"])
        attn[b, sl] = 1
        row_labels = torch.tensor(r["input_ids"])
        row_labels[torch.tensor(r["assistant_masks"]) == 0] = -100
        labels[b, sl] = row_labels
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    return ids, attn, position_ids, labels
