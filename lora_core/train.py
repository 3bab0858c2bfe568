"""LoRA training with TRL's SFTTrainer and peft.

The datasets come pre-tokenized with an `assistant_masks` column (see formatting.py);
TRL folds that mask into the labels, truncates to `max_length` and pads. Checkpoints
(adapter + optimizer + scheduler + RNG) go to `<out>/checkpoints`, the final adapter to
`<out>/adapter`. An existing checkpoint folder is resumed from, never overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from lora_core.base_model import (
    carry_generation_config,
    load_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    quantization_config,
)
from lora_core.config import LoraConfig, TrainConfig
from lora_core.errors import LoraFlowError
from lora_core.hashing import tree_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: str
    adapter_sha256: str  # content of the adapter folder: what downstream caches key on
    global_step: int
    resumed_from_step: int
    train_loss: float
    eval_loss: float | None
    train_tokens: int  # non-padding tokens processed in this session
    train_tokens_per_second: float
    runtime_s: float
    metrics_path: str = ""  # every logged metric as JSONL
    best_checkpoint: str | None = None  # with train.load_best
    # training rows cut by train.max_length, losing reply tokens (check_fits)
    truncated_conversations: int = 0
    # the base's median probability and rank (1 = likeliest) of the end-of-turn token where training replies
    # end (formatting.check_base_predicts_end_of_turn); None: no row trains on a stop token
    end_of_turn_prob: float | None = None
    end_of_turn_rank: int | None = None

    @property
    def adapter(self) -> AdapterRef:
        return AdapterRef(dir=self.adapter_dir, sha256=self.adapter_sha256)


@dataclass(frozen=True)
class AdapterRef:
    """A trained adapter (or full model) folder and the content hash later stages key their caches on."""

    dir: str
    sha256: str


def peft_config(
    cfg: LoraConfig, token_rows: dict[str, list[int]] | None = None, num_layers: int | None = None
):
    """peft's LoraConfig; `token_rows` (module name -> token ids, see end_of_turn_rows) are trained as whole
    rows; `num_layers`, the model's decoder layer count, places `cfg.top_layers`."""
    from peft import LoraConfig as PeftLoraConfig

    layers = None
    if cfg.top_layers is not None and num_layers is not None and cfg.top_layers < num_layers:
        layers = list(range(num_layers - cfg.top_layers, num_layers))

    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        layers_to_transform=layers,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        trainable_token_indices=token_rows,
        bias="none",
        task_type="CAUSAL_LM",
    )


EVAL_SHARE = 0.5  # validation loss halfway and at the end unless train.eval_steps says otherwise


def sft_config(cfg: TrainConfig, output_dir: str, device: str, has_eval: bool, dtype=None):
    """TRL's SFTConfig for `cfg`; `dtype` is the autocast dtype (default: `cfg.dtype` resolved for the
    device). `cfg.trainer_args` come on top of the defaults below (the keys the recipe sets elsewhere were
    refused at validation)."""
    import torch
    from trl import SFTConfig

    dtype = dtype or pick_dtype(cfg.dtype, device)
    defaults = dict(
        report_to="none",  # the flow logs to MLflow through a callback with an explicit run id
        packing=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    return SFTConfig(
        output_dir=output_dir,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        # transformers 5 takes a float < 1 as a ratio of total steps, an int as steps
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps > 0 else cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length,
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        # load_best compares checkpoints by validation loss, so it evaluates at every save; otherwise by
        # default halfway and at the end (a float < 1 is a share of the total steps; each pass costs ~16 s on
        # 2 cores): eval_loss by step
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps or (cfg.save_steps if cfg.load_best else EVAL_SHARE),
        load_best_model_at_end=cfg.load_best and has_eval,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        # transformers 5's name; the old one warns (FutureWarning)
        activation_checkpointing=cfg.gradient_checkpointing,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device == "cpu",
        include_num_input_tokens_seen="non_padding",
        assistant_only_loss=False,  # the mask already comes in the `assistant_masks` column
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        **{**defaults, **cfg.trainer_args},
    )


# trainer_state.json is written last
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


def checkpoint_step(path: str | Path) -> int:
    return int(Path(path).name.rsplit("-", 1)[-1])


def last_checkpoint(checkpoint_dir: str | Path) -> str | None:
    """The newest *complete* checkpoint: one killed mid-save lacks trainer_state.json and is skipped."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    candidates = sorted(
        (
            p
            for p in checkpoint_dir.glob("checkpoint-*")
            if p.is_dir() and p.name.rsplit("-", 1)[-1].isdigit()
        ),
        key=checkpoint_step,
        reverse=True,
    )
    for ckpt in candidates:
        has_weights = any(ckpt.glob("*.safetensors")) or any(ckpt.glob("*.bin"))
        if has_weights and all((ckpt / f).is_file() for f in CHECKPOINT_FILES):
            return str(ckpt)
        log.warning("ignoring incomplete checkpoint %s (killed while saving?)", ckpt)
    return None


def _logged_before(line: str, step: int) -> bool:
    """Whether a metrics.jsonl line belongs to the training up to `step` (not its end summary, not a line cut
    by a kill)."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return False
    return entry.get("step", 0) <= step and "train_loss" not in entry  # train_loss: only in the end summary


def metrics_jsonl_callback(path: Path):
    """A TrainerCallback appending every log line (loss, lr, grad norm, eval loss ...) with its step to
    `path`. A resumed training starts again at its checkpoint's step: what the interrupted one logged after
    that step is dropped first, so each step appears once."""
    from transformers import TrainerCallback

    class MetricsJsonl(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero and path.is_file():
                kept = [
                    line
                    for line in path.read_text(encoding="utf-8").splitlines()
                    if _logged_before(line, state.global_step)
                ]
                path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return MetricsJsonl()


def frozen_base_dtype(base_dtype: str, device: str):
    """'auto': bfloat16 where the hardware has fast bf16 matmuls (CUDA with bf16; CPUs with AVX512-BF16 or
    AMX), else float32. Measured with bench/train_speed.py on a 2-core AVX512-BF16 CPU: bf16 matmul peak
    4.4x fp32's, LoRA training 1.8x faster than with an fp32 base, same validation loss (2.9205 vs 2.9207)."""
    import torch

    if base_dtype != "auto":
        return getattr(torch, base_dtype)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    cpu = torch.cpu
    fast_bf16 = any(
        getattr(cpu, probe, lambda: False)()
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return torch.bfloat16 if fast_bf16 else torch.float32


def autocast_dtype(dtype: str, device: str, weights):
    """`dtype` unless 'auto'. 'auto': bfloat16 on CUDA that supports it; on CPU, bfloat16 when the frozen base
    is held in bfloat16 (LoRA on a fast-bf16 CPU, see frozen_base_dtype), so the LoRA matmuls run in bf16 like
    the base's. Measured with bench/train_speed.py: ~5% faster than fp32 LoRA compute over a bf16 base, same
    loss. Over an fp32 base (full fine-tuning, CPUs without fast bf16) CPU autocast would re-cast every weight
    on every step: float32."""
    import torch

    if dtype != "auto" or device != "cpu":
        return pick_dtype(dtype, device)
    return torch.bfloat16 if weights == torch.bfloat16 else torch.float32


def set_aside(out_dir: Path) -> None:
    """Fresh training: move an existing `out_dir` to `<out_dir>.replaced-<unix time>`, never delete it."""
    if out_dir.exists():
        aside = out_dir.with_name(f"{out_dir.name}.replaced-{int(time.time())}")
        out_dir.rename(aside)
        log.info("fresh training requested: kept the previous run at %s", aside)


def local_rank() -> int:
    """This process's index on its machine under `accelerate launch`/torchrun (LOCAL_RANK), 0 when run
    alone."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """Training processes in this run (WORLD_SIZE under `accelerate launch`/torchrun), 1 when run alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(device: str) -> str:
    """Each rank loads the model straight onto its own GPU (the Trainer would move it there, after a detour
    through GPU 0)."""
    return f"cuda:{local_rank()}" if device == "cuda" and "LOCAL_RANK" in os.environ else device


class TrainError(LoraFlowError):
    """Training cannot start with these data and settings."""


def check_fits(train_ds, max_length: int) -> int:
    """TRL truncates to max_length (keeping the start) and silently drops rows left with no target: refuse
    if none is left, else say in one line how many conversations lose reply tokens to the cut. Returns that
    count."""
    cut, kept, longest = 0, 0, 0
    for masks in train_ds["assistant_masks"]:
        kept += 1 in masks[:max_length]
        if (
            1 in masks[max_length:]
        ):  # a trailing non-target token (a newline after end-of-turn) cut off loses nothing
            cut, longest = cut + 1, max(longest, len(masks))
    if kept == 0:
        raise TrainError(
            f"train.max_length={max_length}: every training conversation has its first assistant token "
            "beyond it "
            "(prompt, system message or tool specs alone are longer); raise train.max_length"
        )
    if cut:
        skipped = (
            f", {len(train_ds) - kept} of them keep no reply token and are skipped"
            if kept < len(train_ds)
            else ""
        )
        log.warning(
            "train.max_length=%d cuts %d of %d training conversations, losing the end of their replies "
            "(longest: "
            "%d tokens)%s; raise train.max_length to %d to train on every reply whole",
            max_length,
            cut,
            len(train_ds),
            longest,
            skipped,
            longest,
        )
    return cut


def end_of_turn_rows(model, token_ids: list[int]) -> dict[str, list[int]]:
    """peft's trainable_token_indices for `token_ids`: their input-embedding rows, and their LM-head rows
    where the head is its own matrix (a tied head reads the embedding's rows: peft ties its copy to the
    embedding's, one set of rows)."""
    names = {module: name for name, module in model.named_modules()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if (
        getattr(head, "bias", None) is not None
    ):  # peft's trainable-token head drops it (huggingface/peft#3649)
        raise TrainError(
            "lora.train_end_of_turn: this model's LM head has a bias, which peft's trainable tokens leave "
            "out; "
            "remove the setting"
        )
    rows = {names[embedding]: token_ids}
    if head is not None and head.weight is not embedding.weight:
        rows[names[head]] = token_ids
    return rows


def expose_head_bias(model) -> None:
    """TRL's fused LM-head loss (CUDA, train.fast_paths=false) reads `lm_head.bias`, which peft's
    TrainableTokensWrapper does not pass through (only `weight`): the wrapped head's bias is None
    (end_of_turn_rows refuses any other)."""
    import torch
    from peft.utils.other import TrainableTokensWrapper

    for module in model.modules():
        if isinstance(module, TrainableTokensWrapper) and isinstance(module.original_module, torch.nn.Linear):
            module.bias = None  # type: ignore[assignment]  # torch's __setattr__ stub leaves out None (accepted)


def train_lora(
    base_path: str,
    train_dir: str,
    *,
    val_dir: str | None,
    lora: LoraConfig,
    cfg: TrainConfig,
    out_dir: str | Path,
    callbacks: list | None = None,
    trust_remote_code: bool = False,
    resume: bool = True,
    tokenizer_dir: str | None = None,
    load_in_4bit: bool = False,
) -> TrainResult:
    """Train on `train_dir` (a saved tokenized dataset): a LoRA adapter, or every weight with
    `cfg.method == "full"`. Returns where the adapter (or full model) landed: `<out_dir>/adapter`.

    With `resume`, training continues from the newest complete checkpoint under `out_dir`
    (same global step, optimizer, scheduler and RNG state). Without it, an existing
    `out_dir` is moved aside to `<out_dir>.replaced-<unix time>`, never deleted.
    """
    import datasets
    import torch
    from peft.helpers import disable_input_dtype_casting
    from transformers import AutoModelForCausalLM, set_seed

    from lora_core.formatting import check_base_predicts_end_of_turn
    from lora_core.speed import attention_implementation, heap_reuse, trainer_class, use_fast_dropout

    out_dir = Path(out_dir)
    if not resume:
        set_aside(out_dir)
    device = pick_device(cfg.device)
    quantization = quantization_config(load_in_4bit, device)
    fast = cfg.fast_paths and device == "cpu"  # the CPU fast paths of speed.py
    attention = attention_implementation(cfg.attn_implementation, device, cfg.fast_paths)
    set_seed(cfg.seed)  # LoRA init draws from the global RNG before the Trainer seeds it
    tokenizer = load_tokenizer(tokenizer_dir or base_path, trust_remote_code)
    weights = torch.float32
    if quantization is not None:
        model = AutoModelForCausalLM.from_pretrained(
            base_path,
            quantization_config=quantization,
            device_map={"": local_rank()},
            trust_remote_code=trust_remote_code,
            attn_implementation=attention,
        )
    else:
        # LoRA: the frozen base may be held in bf16 (peft keeps the adapter and so the optimizer in fp32);
        # full fine-tuning keeps fp32 master weights. On CUDA the Trainer's autocast governs compute.
        weights = frozen_base_dtype(cfg.base_dtype, device) if cfg.method == "lora" else torch.float32
        model = load_model(
            base_path,
            dtype=weights,
            device=rank_device(device),
            trust_remote_code=trust_remote_code,
            attn_implementation=attention,
        )
    # in memory: TRL's .map() caches must not be written into the split stage's (sealed) folder
    train_ds = datasets.load_from_disk(train_dir, keep_in_memory=True)
    val_ds = datasets.load_from_disk(val_dir, keep_in_memory=True) if val_dir else None
    truncated = check_fits(train_ds, cfg.max_length)
    fixing = cfg.method == "lora" and lora.train_end_of_turn
    full = cfg.method == "full"
    eot = check_base_predicts_end_of_turn(
        model, tokenizer, train_ds, cfg.max_length, rows_trained=fixing or full
    )
    if fixing and eot is None:
        raise TrainError(
            "lora.train_end_of_turn: no training row has a stop token (end-of-turn or eos) among its "
            "targets, so "
            "there is no token row to train; remove the setting or train on replies "
            "(template.assistant_only_loss)"
        )
    dtype = autocast_dtype(cfg.dtype, device, weights)
    validates = val_ds is not None and cfg.eval_steps != 0  # 0: the evaluate stage measures it instead
    args = sft_config(cfg, str(out_dir / "checkpoints"), device, has_eval=validates, dtype=dtype)
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    # The compact loss runs the unwrapped model, around DistributedDataParallel's forward: its gradients would
    # never be averaged across ranks (measured on 2 CPU ranks: step-1 grad norm 0.0244 against 0.0208 in one
    # process, and each rank trains its own weights). With several ranks the loss is TRL's, through the
    # wrapper.
    trainer = trainer_class(fast and world_size() == 1)(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        peft_config=peft_config(
            lora,
            end_of_turn_rows(model, eot.taught) if fixing and eot is not None else None,
            num_layers=getattr(model.config, "num_hidden_layers", None),
        )
        if cfg.method == "lora"
        else None,
        callbacks=[*(callbacks or []), metrics_jsonl_callback(out_dir / "checkpoints" / "metrics.jsonl")],
    )
    assert trainer.model is not None  # the Trainer holds the model it was given (peft-wrapped)
    if fixing:
        expose_head_bias(trainer.model)
    if fast:
        log.info("LoRA dropout: %d modules use the fast CPU mask", use_fast_dropout(trainer.model))
    resume_from = last_checkpoint(out_dir / "checkpoints")
    resumed_from = checkpoint_step(resume_from) if resume_from else 0
    if resume_from:
        log.info("resuming training from %s (step %d)", resume_from, resumed_from)
    what = f"LoRA r={lora.r}" if cfg.method == "lora" else "all weights (full fine-tuning)"
    log.info(
        "training %s on %d conversations, device=%s, weights %s, autocast %s, attention %s, loss "
        "%s.compute_loss",
        what,
        len(train_ds),
        device,
        next(model.parameters()).dtype,
        dtype if dtype != torch.float32 else "off",
        model.config._attn_implementation,
        type(trainer).__name__,
    )
    # Under CPU autocast, peft's cast of each LoRA input to fp32 only feeds a matmul that autocast casts back
    # to
    # bf16: skip it (peft's own switch). The LoRA weights, their gradients and the optimizer stay fp32.
    skip_casts = fast and dtype == torch.bfloat16 and cfg.method == "lora" and not lora.use_dora
    started = time.perf_counter()
    with (
        disable_input_dtype_casting(trainer.model, active=skip_casts),
        heap_reuse() if fast else nullcontext(),
    ):
        out = trainer.train(resume_from_checkpoint=resume_from)
    runtime = time.perf_counter() - started
    eval_loss = None
    if validates:
        last = [h for h in trainer.state.log_history if "eval_loss" in h]
        at_end = last and last[-1].get("step") == trainer.state.global_step and not cfg.load_best
        eval_loss = float(last[-1]["eval_loss"] if at_end else trainer.evaluate()["eval_loss"])
    if cfg.load_best and trainer.state.best_model_checkpoint:
        log.info(
            "kept the best checkpoint by validation loss: %s (%.4f)",
            trainer.state.best_model_checkpoint,
            trainer.state.best_metric,
        )
    adapter_dir = out_dir / "adapter"
    trainer.save_model(str(adapter_dir))  # adapter (or full model) + tokenizer + chat template
    if trainer.is_world_process_zero():  # the one process that wrote the adapter
        # stop tokens: eos + the end-of-turn token
        carry_generation_config(tokenizer_dir or base_path, adapter_dir)
    # other ranks hash the adapter once it is complete (no-op in one process)
    trainer.accelerator.wait_for_everyone()
    tokens = int(trainer.state.num_input_tokens_seen) - int(
        getattr(trainer, "_initial_num_input_tokens_seen", 0) or 0
    )
    result = TrainResult(
        adapter_dir=str(adapter_dir),
        adapter_sha256=tree_sha256(adapter_dir),
        global_step=int(trainer.state.global_step),
        resumed_from_step=resumed_from,
        train_loss=float(out.training_loss),
        eval_loss=eval_loss,
        train_tokens=tokens,
        train_tokens_per_second=tokens / runtime if runtime > 0 else 0.0,
        runtime_s=runtime,
        metrics_path=str(out_dir / "checkpoints" / "metrics.jsonl"),
        best_checkpoint=trainer.state.best_model_checkpoint if cfg.load_best else None,
        truncated_conversations=truncated,
        end_of_turn_prob=eot.prob if eot else None,
        end_of_turn_rank=eot.rank if eot else None,
    )
    del trainer, model
    return result
