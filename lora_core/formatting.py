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


NO_TEMPLATE = ("the base tokenizer has no chat template (GGUF files often carry none); set template.chat_template to a "
               "Jinja chat-template file for this model family, or use a 'text' dataset")


def encode_conversation(tokenizer, messages: list[dict], tools: list | None = None, assistant_only: bool = True) -> Encoded:
    if not tokenizer.chat_template:
        raise FormatError(NO_TEMPLATE)
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


PROBE = [{"role": "user", "content": "Probe question?"}, {"role": "assistant", "content": "Probe reply 42."}]


def special_tokens(tokenizer) -> set[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    return set(tokenizer.all_special_tokens) | {t.content for t in added if t.special}


def token_after_reply(tokenizer) -> str | None:
    """The special token the chat template writes right after an assistant reply (whitespace skipped), or None.
    Raises jinja2's TemplateError when the template cannot render a user/assistant exchange."""
    reply = PROBE[-1]["content"]
    text = _render(tokenizer, PROBE, None)
    at = text.rfind(reply)
    if at < 0:
        return None
    ids = tokenizer(text[at + len(reply):].lstrip(), add_special_tokens=False)["input_ids"]
    token = tokenizer.convert_ids_to_tokens(ids[0]) if ids else None
    return token if token in special_tokens(tokenizer) else None


def end_of_turn(tokenizer, override: str | None = None) -> str:
    """The token that closes an assistant turn: `override` (template.end_of_turn), checked against the vocabulary,
    else the one the chat template writes after a reply. A FormatError of one line, with the fix, when neither works."""
    from jinja2 import TemplateError

    if override is not None:
        if override not in tokenizer.get_vocab():
            raise FormatError(f"template.end_of_turn {override!r} is not a token of the base tokenizer's vocabulary; set it "
                              "to the token that closes an assistant turn (e.g. '<|im_end|>', '<end_of_turn>', '<|eot_id|>')")
        return override
    if not tokenizer.chat_template:
        raise FormatError(NO_TEMPLATE)
    try:
        token = token_after_reply(tokenizer)
    except TemplateError as exc:
        raise FormatError(f"the chat template cannot render a user/assistant exchange ({exc}); fix it or set "
                          "template.chat_template to one that can") from None
    if token is None:
        raise FormatError("the chat template writes no special token right after an assistant reply, so the token that ends a "
                          "turn is unknown; set template.end_of_turn to it (e.g. '<|im_end|>', '<end_of_turn>', '<|eot_id|>')")
    return token


def check_end_of_turn_trained(tokenizer, encoded: Encoded, end_of_turn_id: int | None = None) -> None:
    """Every trained run of tokens (a reply) must end with the end-of-turn token, or the tuned model never learns to stop.
    `end_of_turn_id` defaults to the one the chat template writes (end_of_turn)."""
    eot = tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer)) if end_of_turn_id is None else end_of_turn_id
    ids, mask = encoded.input_ids, encoded.assistant_masks
    run_ends = [ids[i] for i in range(len(ids)) if mask[i] and (i + 1 == len(ids) or not mask[i + 1])]
    if not run_ends or any(t != eot for t in run_ends):
        raise FormatError(
            f"the end-of-turn token {tokenizer.convert_ids_to_tokens(eot)!r} does not close every assistant reply inside the "
            "loss mask, so the tuned model would not learn to stop; set template.end_of_turn to the token the chat "
            "template writes after a reply"
        )


@dataclass(frozen=True)
class EndOfTurnOdds:
    taught: list[int]  # the stop tokens the rows train on, commonest (the end-of-turn token) first
    prob: float  # the model's median probability of taught[0] where it ends a reply
    rank: int  # its median rank there (1 = likeliest) ...
    vocab: int  # ... of this many tokens
    replies: int  # reply ends measured


def end_of_turn_odds(model, tokenizer, input_ids: list[list[int]], assistant_masks: list[list[int]], max_length: int,
                     rows: int = 16) -> EndOfTurnOdds | None:
    """How likely `model` finds the token that ends the replies of encoded rows (cut to `max_length`), measured in one
    no-grad forward of the first `rows` rows that have one; None when no row trains on a stop token. The stop tokens are
    inference.stop_token_ids'; a reply ends where one is a target (each reply's mask closes with the end-of-turn token,
    a text record with eos)."""
    import statistics
    from collections import Counter

    import torch

    from lora_core.evaluate import pad_batch
    from lora_core.inference import stop_token_ids

    stops = set(stop_token_ids(model, tokenizer))
    ends = [[t for t, i in enumerate(ids[:max_length]) if t > 0 and i in stops and masks[t]]
            for ids, masks in zip(input_ids, assistant_masks)]
    taught = [token for token, _ in Counter(ids[t] for ids, at in zip(input_ids, ends) for t in at).most_common()]
    if not taught:
        return None
    sample = []  # each cut after its last reply end, with a mask of 1 exactly at its end-of-turn targets
    for ids, at in zip(input_ids, ends):
        at = [t for t in at if ids[t] == taught[0]]
        if at and len(sample) < rows:
            sample.append({"input_ids": ids[: at[-1] + 1], "assistant_masks": [int(t in at) for t in range(at[-1] + 1)]})
    ids, attn, _, labels = pad_batch(sample, tokenizer.pad_token_id)  # right-padded: a causal model's logits unchanged
    keep = torch.zeros_like(attn, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100  # the positions predicting an end-of-turn token
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), logits_to_keep=keep.to(device)).logits.float()
    eot = logits[:, taught[0]]
    return EndOfTurnOdds(taught, statistics.median(logits.softmax(-1)[:, taught[0]].tolist()),
                         statistics.median_low((logits > eot[:, None]).sum(-1).add(1).tolist()), logits.shape[-1], len(logits))


# Median probability under which the base is taken never to predict the end-of-turn token: a loss above ln(1e4) = 9.2
# nats on the one token that closes every reply, worse than a uniform guess over 10,000 tokens. Measured at the ends of
# the tutoring replies: SmolLM2-135M-Instruct gives its <|im_end|> 0.15 (median rank 2); Gemma 3 270M gives its
# <end_of_turn> 1.1e-11 (rank 256,693 of 262,144: its row sits by an unused token's), which a short LoRA run did not lift.
UNLEARNT_PROB = 1e-4


def check_base_predicts_end_of_turn(model, tokenizer, train_ds, max_length: int, *, rows_trained: bool) -> EndOfTurnOdds | None:
    """The train stage's check, before training: the base's EndOfTurnOdds on the first 16 training rows, logged; below
    UNLEARNT_PROB one warning with the fix, unless the token's rows are trained anyway (`rows_trained`:
    lora.train_end_of_turn, or full fine-tuning). One no-grad forward: 22 s for Gemma 3 270M on 2 busy CPU cores, where
    its training steps (8 conversations) took 9-12 s."""
    odds = end_of_turn_odds(model, tokenizer, train_ds["input_ids"], train_ds["assistant_masks"], max_length)
    if odds is None:
        return None
    token = tokenizer.convert_ids_to_tokens(odds.taught[0])
    if odds.prob >= UNLEARNT_PROB or rows_trained:
        log.info("end of turn: the base gives %r a median probability of %.2g (rank %d) where %d training replies end%s", token,
                 odds.prob, odds.rank, odds.replies, "; its rows are trained" if rows_trained else "")
    else:
        log.warning("the base model never predicts the end-of-turn token %r where training replies end (median probability "
                    "%.1e, rank %d of %d, over %d replies): LoRA alone may not teach it to stop and replies can run to the "
                    "token limit; set lora.train_end_of_turn=true to train that token's embedding and LM-head rows",
                    token, odds.prob, odds.rank, odds.vocab, odds.replies)
    return odds


def prompt_messages(messages: list[dict]) -> tuple[list[dict], str]:
    """Everything before the first assistant reply, and that reply (for side-by-side samples)."""
    i = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:i], messages[i]["content"]


# --------------------------------------------------------------------------- stage


@dataclass(frozen=True)
class FormatResult:
    dataset_dir: str  # datasets.save_to_disk: input_ids, assistant_masks, key, source, record
    tokenizer_dir: str  # the tokenizer used, with its (possibly replaced) chat template and generation_config.json
    n_rows: int
    max_tokens: int
    end_of_turn: str | None = None  # the token that closes an assistant turn (None: no conversations)


def with_default_system_prompt(template: str, system_prompt: str) -> str:
    """The chat template with `system_prompt` as the system message of any conversation that has none:
    a chat renders exactly as the training data did (template.system_prompt injected), and a request
    that brings its own system message keeps it."""
    import json

    # a JSON string literal is a valid Jinja string literal (same escapes)
    head = ("{%- if messages and messages[0]['role'] != 'system' -%}"
            f"{{%- set messages = [{{'role': 'system', 'content': {json.dumps(system_prompt)}}}] + messages -%}}"
            "{%- endif -%}\n")
    return head + template


def format_dataset(records_path: str, val_records_path: str | None, tokenizer_path: str, cfg, out_dir, trust_remote_code: bool = False) -> FormatResult:
    """Render every conversation with the base tokenizer's chat template and build its loss mask.
    Problems of the model (no chat template, unknown end-of-turn token) are one line, raised before any record
    is encoded; problems of records are listed by record, at most 20."""
    import json
    from pathlib import Path

    import datasets

    from lora_core.base_model import load_tokenizer, save_generation_config
    from lora_core.data import inject_system_prompt, read_jsonl, record_key

    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
    if cfg.chat_template:
        template = Path(cfg.chat_template)
        if not template.is_file():
            raise FormatError(f"template.chat_template {cfg.chat_template!r}: no such file; point it at a .jinja chat template")
        tokenizer.chat_template = template.read_text()
    sources = [("train", records_path)] + ([("val", val_records_path)] if val_records_path else [])
    loaded = [(source, inject_system_prompt(read_jsonl(path), cfg.system_prompt)) for source, path in sources]
    eot = eot_id = None
    if cfg.end_of_turn or any("messages" in r for _, records in loaded for r in records):
        eot = end_of_turn(tokenizer, cfg.end_of_turn)
        eot_id = tokenizer.convert_tokens_to_ids(eot)
        log.info("end of turn: %r (id %d), %s", eot, eot_id, "template.end_of_turn" if cfg.end_of_turn else "from the chat template")
    columns: dict[str, list] = {"input_ids": [], "assistant_masks": [], "key": [], "source": [], "record": []}
    problems = []
    checked_eot = False
    for source, records in loaded:
        for i, rec in enumerate(records):
            try:
                enc = encode_record(tokenizer, rec, cfg.assistant_only_loss)
            except FormatError as exc:
                problems.append(f"{source} record {i}: {exc}")
                continue
            if cfg.assistant_only_loss and "messages" in rec and not checked_eot:
                check_end_of_turn_trained(tokenizer, enc, eot_id)  # a property of the template: checked once, raised once
                checked_eot = True
            columns["input_ids"].append(enc.input_ids)
            columns["assistant_masks"].append(enc.assistant_masks)
            columns["key"].append(record_key(rec))
            columns["source"].append(source)
            columns["record"].append(json.dumps(rec, ensure_ascii=False))
    if problems:
        raise FormatError("\n".join(problems[:20]))
    ds = datasets.Dataset.from_dict(columns)
    ds.save_to_disk(str(Path(out_dir) / "formatted"))
    if cfg.system_prompt:  # what was trained on is what every saved model folder and registry version serves
        tokenizer.chat_template = with_default_system_prompt(tokenizer.chat_template, cfg.system_prompt)
    tokenizer_dir = Path(out_dir) / "tokenizer"
    tokenizer.save_pretrained(str(tokenizer_dir))
    if eot_id is not None:
        save_generation_config(tokenizer_path, [eot_id], tokenizer_dir, trust_remote_code)
    return FormatResult(str(Path(out_dir) / "formatted"), str(tokenizer_dir), len(ds), max(len(x) for x in columns["input_ids"]), eot)
