"""Every check of a recipe that needs no model weights, all reported at once (`lora-flow validate`).

`check(cfg)` returns one line per problem, each naming the file/line or key and the fix:
- data: every source (data.path, data.mix, data.validation_path) reads and normalises;
- split: split.val_size / val_fraction can be met by distinct conversations, leaving one to train on;
- device: train.device=cuda and model.load_in_4bit (QLoRA) need a CUDA GPU (and bitsandbytes);
- a local model folder: config.json parses and transformers reads it, a weights file exists, the tokenizer
loads;
- chat data: the tokenizer has a chat template, or template.chat_template names a template file;
- template.end_of_turn, as the format stage checks it: a token of the vocabulary (when unset: the chat
  template writes a special token after a reply), and the token that closes a reply inside the loss mask;
- train.max_length keeps a target (assistant) token of at least one training conversation. Exact, not
  estimated: conversations are encoded as the format stage does (chat template + loss mask), stopping at
  the first one that keeps a target, so a dataset that fits costs one encoding.
The tokenizer comes from a local folder, the converted copy in cache_dir of the embedded model or of a
.gguf file, a .gguf file not converted yet, or the HF cache; when none is on disk the tokenizer checks are
skipped (and logged), never downloaded or converted. From a .gguf file transformers builds the tokenizer out
of the GGUF's tokenizer.* metadata (memory-mapped) and neither reads nor dequantises the weights: about 5 s
for SmolLM2-135M's 93 MB GGUF on 2 CPU cores, against about 2 minutes for the conversion `run` does.
A hub id not in the HF cache is looked up on the hub (model_info, at most ~10 s):
a repository or revision the hub says does not exist is a problem; offline (HF_HUB_OFFLINE) or when the
hub does not answer, it is a note (`review`), since a run elsewhere, online and logged in, may still fetch it.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from lora_core.base_model import (
    _COMPLETE,
    EMBEDDED,
    BaseModelError,
    base_kind,
    load_tokenizer,
    pick_device,
    quantization_config,
)
from lora_core.config import PipelineConfig
from lora_core.data import DataError, inject_system_prompt, split_indices
from lora_core.formatting import (
    PROBE,
    FormatError,
    check_end_of_turn_trained,
    encode_conversation,
    encode_record,
    end_of_turn,
)
from lora_core.hashing import file_sha256
from lora_core.streaming import column, gather_dataset, select

log = logging.getLogger(__name__)

# transformers' own file names (transformers.utils): single file or sharded index, safetensors or torch
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# a hub that has not answered model_info by then leaves model.base "not checked", not refused
HUB_TIMEOUT_S = 10


@dataclass(frozen=True)
class Review:
    problems: list[str] = field(default_factory=list)  # one line each, with the fix: run and validate refuse
    # what could not be checked here (a hub id, offline): no refusal
    notes: list[str] = field(default_factory=list)


def check(cfg: PipelineConfig) -> list[str]:
    """Every problem found without loading model weights; an empty list means the recipe should run."""
    return review(cfg).problems


def review(cfg: PipelineConfig) -> Review:
    """`check`'s problems, and notes naming what could not be checked."""
    with tempfile.TemporaryDirectory(
        prefix="lora-flow-validate-"
    ) as work:  # the data's Arrow files, memory-mapped
        return _review(cfg, Path(work))


def _review(cfg: PipelineConfig, work: Path) -> Review:
    found = Review()
    problems = found.problems
    train_records, fmt = _data(cfg, problems, work)
    problems += _device(cfg)
    problems += _template_file(cfg)
    source = _tokenizer_source(cfg, found)
    tokenizer = _load_tokenizer(cfg, source, problems) if source else None
    chat = fmt != "text"
    if tokenizer is not None and chat:
        problems += _chat_template(cfg, tokenizer)
    if tokenizer is not None and (cfg.template.end_of_turn or (chat and tokenizer.chat_template)):
        problems += _end_of_turn(cfg, tokenizer, chat)
    if tokenizer is not None and train_records and (fmt == "text" or tokenizer.chat_template):
        problems += _fits(cfg, tokenizer, train_records)
    return found


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


# --------------------------------------------------------------------------- data, split, device


def _data(cfg: PipelineConfig, problems: list[str], work: Path) -> tuple[Iterator[dict] | None, str]:
    """The training conversations as the format and split stages will see them (read lazily from Arrow
    files in `work`), and the data format."""
    system_prompt = cfg.template.system_prompt
    # the flow seeds the mix sampling with split.seed; keys are those of the records with the system prompt
    try:
        gathered = gather_dataset(cfg.data, cfg.split.seed, work=work, system_prompt=system_prompt)
    except DataError as exc:
        problems.extend(str(exc).splitlines())
        return None, cfg.data.format
    records = gathered.records
    if gathered.val_records is None:  # else a validation file replaces the random split
        try:
            train, _ = split_indices(
                column(records, "key"), cfg.split.val_fraction, cfg.split.val_size, cfg.split.seed
            )
        except DataError as exc:
            problems.append(f"{exc} (data.path {cfg.data.path})")
            return None, gathered.format
        records = select(records, train)
    rows = (
        json.loads(r)
        for batch in records.select_columns(["record"]).iter(batch_size=100)
        for r in batch["record"]
    )
    return (inject_system_prompt([r], system_prompt)[0] for r in rows), gathered.format


def _device(cfg: PipelineConfig) -> list[str]:
    try:
        quantization_config(cfg.model.load_in_4bit, pick_device(cfg.train.device))
    except BaseModelError as exc:
        return [str(exc)]
    return []


def _template_file(cfg: PipelineConfig) -> list[str]:
    path = cfg.template.chat_template
    if path and not Path(path).is_file():
        return [
            f"template.chat_template {path!r}: no such file; point it at a .jinja chat template (e.g. "
            "recipes/templates/chatml-tools.jinja)"
        ]
    return []


# --------------------------------------------------------------------------- the model folder and tokenizer


def _converted(cfg: PipelineConfig, name: str, sha256: str) -> Path | None:
    """The folder base_model converts a GGUF into (`<cache_dir>/<name>-<sha256[:16]>`), if the conversion
    finished."""
    folder = Path(cfg.cache_dir).expanduser() / f"{name}-{sha256[:16]}"
    return folder if (folder / _COMPLETE).is_file() else None


def _tokenizer_source(cfg: PipelineConfig, found: Review) -> Path | None:
    """The folder (or, for a GGUF not converted yet, the .gguf file) the tokenizer will come from, if it is
    on disk (problems of a local folder or hub id appended)."""
    problems, base = found.problems, cfg.model.base
    local = Path(base).expanduser()
    kind = base_kind(base)
    if kind == "embedded":
        converted = _converted(cfg, base, EMBEDDED[base]["sha256"])
        if converted is None:
            log.info("%s is not converted yet in %s: tokenizer checks skipped", base, cfg.cache_dir)
        return converted
    if kind == "gguf":  # a GGUF file is converted once, keyed by its content
        if not local.is_file():
            problems.append(f"model.base {base!r}: no such GGUF file; fix the path")
            return None
        return _converted(cfg, local.stem, file_sha256(local)) or local
    if kind == "local":
        bad, sound = _local_model(cfg, local)
        problems += bad
        return local if sound else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(base, "tokenizer_config.json", revision=cfg.model.revision)
    if isinstance(cached, str):
        return Path(cached).parent  # the snapshot folder resolve_base would download into
    log.info("%s is not in the Hugging Face cache: tokenizer checks skipped", base)
    _on_the_hub(cfg, found)
    return None


def _on_the_hub(cfg: PipelineConfig, found: Review) -> None:
    """Ask the hub whether model.base (at model.revision) exists: huggingface_hub's model_info, with the saved
    token."""
    import httpx2  # huggingface_hub's HTTP client: its transport errors mean the hub was not reached
    from huggingface_hub import constants, model_info
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    base, revision = cfg.model.base, cfg.model.revision
    if constants.is_offline_mode():
        found.notes.append(
            f"model.base {base!r} not checked: offline (HF_HUB_OFFLINE=1) and not in the local "
            "Hugging Face cache"
        )
        return
    try:
        model_info(base, revision=revision, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:  # before RepositoryNotFoundError, its base class
        found.problems.append(
            f"model.base {base!r}: a gated repository your Hugging Face token cannot read; "
            "accept its terms on its hub page and log in (`hf auth login`), or use a local folder"
        )
    except RepositoryNotFoundError:
        found.problems.append(
            f"model.base {base!r}: no such model on the Hugging Face hub ({constants.ENDPOINT}); "
            "check the id, log in (`hf auth login`) for a gated or private repository, "
            "or use a local folder"
        )
    except RevisionNotFoundError:
        found.problems.append(
            f"model.revision {revision!r}: {base!r} has no such branch, tag or commit on the hub; "
            "fix model.revision or leave it out"
        )
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "error"
        found.notes.append(
            f"model.base {base!r} not checked: the hub ({constants.ENDPOINT}) answered HTTP {status}"
        )
    except (httpx2.TransportError, OSError) as exc:  # timeout, no route, DNS, TLS
        found.notes.append(
            f"model.base {base!r} not checked: the hub ({constants.ENDPOINT}) cannot be reached "
            f"({type(exc).__name__})"
        )


def _local_model(cfg: PipelineConfig, folder: Path) -> tuple[list[str], bool]:
    """Problems of a local model folder, and whether its config is sound enough to load the tokenizer."""
    base, config = cfg.model.base, folder / "config.json"
    if not config.is_file():
        gguf = next(iter(sorted(folder.glob("*.gguf"))), None) if folder.is_dir() else None
        hint = (
            f" ({gguf.name} is a GGUF: lora-flow loads a transformers folder, so convert it with "
            "save_pretrained)"
            if gguf
            else ""
        )
        return [
            f"model.base {base!r}: no such model directory (need {config}){hint}; "
            "fix the path or use 'smollm2-135m-instruct'"
        ], False
    try:
        json.loads(config.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        return [
            f"{config}: not UTF-8 text; save the model again with save_pretrained (model.base {base!r})"
        ], False
    except json.JSONDecodeError as exc:
        return [
            f"{config}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); fix the file or save "
            "the "
            f"model again with save_pretrained (model.base {base!r})"
        ], False
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
    except (
        OSError,
        ValueError,
    ) as exc:  # what transformers raises for a config it cannot read (e.g. no model_type)
        return [
            f"{config}: transformers cannot read it ({_first_line(exc)}); fix the file or save the model "
            "again "
            f"with save_pretrained (model.base {base!r})"
        ], False
    return _weights(base, folder), True


def _weights(base: str, folder: Path) -> list[str]:
    present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        gguf = next(iter(sorted(folder.glob("*.gguf"))), None)
        hint = (
            f" ({gguf.name} is a GGUF, which is not loaded from a folder: convert it to safetensors)"
            if gguf
            else ""
        )
        return [
            f"model.base {base!r}: no weights in {folder} (need one of {', '.join(WEIGHT_FILES)}){hint}; "
            "save the model there with save_pretrained"
        ]
    index = next((folder / n for n in present if n.endswith(".index.json")), None)
    if index is not None and not any(n in present for n in ("model.safetensors", "pytorch_model.bin")):
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError, TypeError):
            return [
                f"{index}: not a weight index (JSON with a 'weight_map'); save the model again with "
                "save_pretrained"
            ]
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            return [
                f"{index}: {len(missing)} of {len(shards)} weight shards are missing (first: {missing[0]}); "
                "copy every shard into the folder"
            ]
    return []


def _load_tokenizer(cfg: PipelineConfig, source: Path, problems: list[str]) -> Any | None:
    if source.is_file():
        return _gguf_tokenizer(cfg, source, problems)
    try:
        return load_tokenizer(str(source), cfg.model.trust_remote_code)
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
    ) as exc:  # what transformers raises for missing or broken tokenizer files
        problems.append(
            f"model.base {cfg.model.base!r}: the tokenizer in {source} does not load ({type(exc).__name__}: "
            f"{_first_line(exc)}); save it there with tokenizer.save_pretrained"
        )
        return None


def _gguf_tokenizer(cfg: PipelineConfig, gguf: Path, problems: list[str]) -> Any | None:
    """The tokenizer the conversion will save, built by transformers from the GGUF's tokenizer.* metadata
    alone (the same call base_model.materialise_gguf makes; tensors are never read)."""
    from transformers import AutoTokenizer

    log.info(
        "%s is not converted yet in %s: its tokenizer is read from the GGUF metadata", gguf, cfg.cache_dir
    )
    try:
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
    ) as exc:  # an unknown architecture or tokenizer, or not a GGUF
        problems.append(
            f"model.base {cfg.model.base!r}: transformers cannot read this GGUF's tokenizer "
            f"({type(exc).__name__}: {_first_line(exc)}); convert the model to a transformers directory "
            "and point model.base at it"
        )
        return None


def _chat_template(cfg: PipelineConfig, tokenizer) -> list[str]:
    """Chat data needs a template: the recipe's file replaces the tokenizer's, as in the format stage."""
    path = cfg.template.chat_template
    if path and Path(path).is_file():
        tokenizer.chat_template = Path(path).read_text(encoding="utf-8")
        return []
    if not tokenizer.chat_template and not path:
        base = cfg.model.base
        if base_kind(base) in ("embedded", "gguf"):  # the tokenizer is the GGUF's, template and all
            return [
                f"model.base {base!r}: its GGUF metadata has no chat template (tokenizer.chat_template), "
                "so conversations cannot be rendered; set template.chat_template to a Jinja chat-template "
                "file for this model family (recipes/templates/chatml-tools.jinja is ChatML's), "
                "or use 'text' data"
            ]
        return [
            f"model.base {base!r}: the tokenizer has no chat template, so conversations cannot be "
            "rendered; set template.chat_template to a .jinja template file (e.g. "
            "recipes/templates/chatml-tools.jinja), "
            "use a chat model, or use 'text' data"
        ]
    return []


def _end_of_turn(cfg: PipelineConfig, tokenizer, chat: bool) -> list[str]:
    """The format stage's end-of-turn checks, on one short exchange: template.end_of_turn is a token of the
    vocabulary (unset: the chat template writes one after a reply), and it closes the reply inside the loss
    mask."""
    from jinja2 import TemplateError

    try:
        eot_id = tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer, cfg.template.end_of_turn))
    except FormatError as exc:
        return [str(exc)]
    if not (chat and cfg.template.assistant_only_loss and tokenizer.chat_template):
        return []
    try:
        probe = encode_conversation(tokenizer, PROBE)
    except (
        FormatError,
        TemplateError,
    ):  # a template that cannot render conversations: _fits names the records
        return []
    try:
        # a property of the template: one exchange shows it
        check_end_of_turn_trained(tokenizer, probe, eot_id)
    except FormatError as exc:
        return [str(exc)]
    return []


def _fits(cfg: PipelineConfig, tokenizer, records: Iterator[dict]) -> list[str]:
    """Encode training conversations until one keeps a target token within train.max_length."""
    from jinja2 import TemplateError

    max_length, assistant_only = cfg.train.max_length, cfg.template.assistant_only_loss
    failures: dict[str, int] = {}  # problem -> first training record index showing it
    first_targets = []  # token index of the first target of each conversation
    for i, rec in enumerate(records):
        try:
            enc = encode_record(tokenizer, rec, assistant_only)
        except (FormatError, TemplateError) as exc:
            failures.setdefault(_first_line(exc), i)
            continue
        if 1 in enc.assistant_masks[:max_length]:
            break
        first_targets.append(enc.assistant_masks.index(1))
    else:
        if first_targets:
            shortest = min(first_targets)
            failures[
                f"train.max_length={max_length}: no training conversation keeps an assistant token within it "
                f"(the shortest prompt before a reply is {shortest} tokens); raise train.max_length above "
                f"{shortest}, "
                "or shorten the system prompt"
            ] = -1
    return [msg if i < 0 else f"train record {i}: {msg}" for msg, i in failures.items()]
