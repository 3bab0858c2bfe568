"""Training fast paths, each kept because bench/train_speed.py measured it faster on a 2-core CPU with the
same validation loss. CUDA keeps the libraries' own paths (TRL's Triton LM head, torch's Philox dropout,
SDPA attention), which are already fast there.

- `attention_implementation`: eager attention on CPU. With ~150-token conversations, torch's CPU flash-SDPA
  kernel (and its backward) cost more than eager's two bf16 batched matmuls and an fp32 softmax.
- `CompactLossSFTTrainer`: the LM head projects only positions whose next token is a target (40% of the
  tokens of the default recipe), once, with plain autograd. TRL's fused head on a device without Triton
  scores every padded position in vocabulary tiles and recomputes them in backward with an fp32 cast of the
  head each tile: a third of every training step here.
- `FastDropout`: LoRA dropout with the mask drawn as 16-bit integers (a quarter of a 64-bit draw each) instead
  of torch's CPU `bernoulli_`, which took a sixth of every step. Same semantics: each input element is kept
  with probability 1 - p (p rounded to a multiple of 1/65536) and scaled by 1/(1 - p).

- `heap_reuse`: glibc keeps freed activation buffers (0.1-30 MB, allocated and freed hundreds of times per
  step) in its heap during training instead of unmapping and page-faulting them back: ~3% here.

None of them may change what is computed. The compact loss applies the logit post-processing the model's own
forward applies (Cohere's `logit_scale`, Gemma's `final_logit_softcapping`) and leaves models with any other
kind to TRL; it reads SFTTrainer internals, so a TRL outside the tested range (or without the private helper
it calls) gets TRL's own loss and one warning. `train.fast_paths=false` turns every one of them off.

Imported only by train.py, when training starts (it imports torch).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging

import torch
from trl import SFTTrainer

from lora_core.evaluate import LOGIT_KEYS

log = logging.getLogger(__name__)

# the TRL releases CompactLossSFTTrainer was checked against; pyproject.toml pins the same
TESTED_TRL = ">=1.16,<1.17"


def trl_use_triton(version: str | None = None):
    """TRL's private `_use_triton(device)`, or a string saying why TRL (installed, or `version`) is not one
    the compact loss was tested with."""
    import trl
    from packaging.specifiers import SpecifierSet

    version = version or trl.__version__
    if version not in SpecifierSet(TESTED_TRL):
        return f"TRL {version} is outside the tested range {TESTED_TRL}"
    try:
        from trl.trainer.utils import _use_triton
    except ImportError:
        return f"TRL {version} has no trl.trainer.utils._use_triton"
    return _use_triton


def trainer_class(fast_paths: bool, trl_version: str | None = None) -> type[SFTTrainer]:
    """CompactLossSFTTrainer where the fast paths are on and TRL (installed, or `trl_version`) is a tested
    one; TRL's SFTTrainer otherwise, with one warning when TRL is the reason."""
    if not fast_paths:
        return SFTTrainer
    use_triton = trl_use_triton(trl_version)
    if isinstance(use_triton, str):
        log.warning("%s: training uses TRL's own loss (the compact CPU loss reads TRL internals)", use_triton)
        return SFTTrainer
    return CompactLossSFTTrainer


# Config keys by which transformers models post-process their logits (the same list TRL's fused head reads).
# The compact loss reproduces the first two; a model using any other one gets TRL's loss.
LOGIT_SCALE, SOFTCAP = "logit_scale", "final_logit_softcapping"
OTHER_LOGIT_KEYS = tuple(k for k in LOGIT_KEYS if k not in (LOGIT_SCALE, SOFTCAP))


def logit_postprocessing(config) -> tuple[float, float | None] | None:
    """(scale, softcap) the model applies to its LM head's output, as `softcap * tanh(scale * logits /
    softcap)` (Cohere multiplies by `logit_scale`; Gemma 2/3 soft-cap with `final_logit_softcapping`), or
    None when it post-processes them in another way."""
    text = config.get_text_config()
    if any(getattr(text, key, None) not in (None, 1, 1.0) for key in OTHER_LOGIT_KEYS):
        return None
    scale = getattr(text, LOGIT_SCALE, None)
    return (1.0 if scale is None else float(scale)), getattr(text, SOFTCAP, None) or None


def postprocess_logits(logits: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
GLIBC_DEFAULT_THRESHOLD = 128 * 1024  # bytes, both parameters' defaults


@contextlib.contextmanager
def heap_reuse(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20):
    """Within the block, glibc serves allocations up to `mmap_threshold` bytes (its maximum, 32 MB) from
    the heap and trims the heap top only past `trim_threshold`; afterwards the defaults come back and the
    heap is trimmed. A no-op where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        yield
        return
    applied = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(
        M_TRIM_THRESHOLD, trim_threshold
    )
    try:
        yield
    finally:
        if applied:
            libc.mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
            libc.malloc_trim(0)


def attention_implementation(choice: str, device: str, fast_paths: bool = True) -> str | None:
    """`choice` unless 'auto'; 'auto' is eager on CPU with the fast paths on, else the transformers default
    (None: SDPA)."""
    if choice != "auto":
        return choice
    return "eager" if device == "cpu" and fast_paths else None


class FastDropout(torch.nn.Module):
    """`torch.nn.Dropout(p)` in training mode, with a cheaper CPU mask (see the module docstring)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        # int16 r is dropped when r < threshold: P = round(p * 2^16) / 2^16
        self.threshold = round(p * 65536) - 32768

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        # one 64-bit draw gives four 16-bit lanes: half the generator time of 32-bit draws, a fifth of
        # bernoulli_'s
        bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= self.threshold
        scale, zero = x.new_full((), 1.0 / (1.0 - self.p)), x.new_zeros(())
        # autograd keeps the mask in x's dtype: backward is grad * mask
        return x * torch.where(keep, scale, zero)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Swap peft's LoRA dropout modules for `FastDropout` (same p); returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                dropouts[name] = FastDropout(dropout.p)
                swapped += 1
    return swapped


class CompactLossSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer; on devices without Triton the loss comes from the target positions only (module
    docstring).

    The loss is TRL's (sum of target-token NLL over the tokens of the whole accumulated batch), and so are the
    logged entropy, mean token accuracy and token count. Anything this path does not cover (label smoothing, a
    custom loss, DFT, MoE aux loss, padding-free batches, logit post-processing other than scale and soft-cap)
    goes to TRL's own compute_loss. Build it through trainer_class(), which checks the TRL version.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        use_triton = trl_use_triton()
        self._use_triton = use_triton if callable(use_triton) else None  # None: an untested TRL, its own loss
        self._logits = logit_postprocessing(self.accelerator.unwrap_model(self.model).config)
        if self._logits is None:
            log.info(
                "the model post-processes its logits in a way the compact loss does not reproduce: TRL's loss"
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if (
            return_outputs
            or labels is None
            or self._logits is None
            or self._use_triton is None
            or self._use_triton(labels.device)
            or self.compute_loss_func is not None
            or self.label_smoother is not None
            or self.args.loss_type != "nll"
            or self.aux_loss_enabled
            or "attention_mask" not in inputs
        ):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        causal_lm = self.accelerator.unwrap_model(model)
        if hasattr(causal_lm, "get_base_model"):
            # peft: the LoRA layers live inside the base model's modules
            causal_lm = causal_lm.get_base_model()
        targets = labels[:, 1:]
        mask = targets != -100
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        with self.accelerator.autocast():
            hidden = causal_lm.base_model(**forward, use_cache=False).last_hidden_state[:, :-1][mask]
            logits = postprocess_logits(causal_lm.get_output_embeddings()(hidden).float(), *self._logits)
        log_probs = torch.log_softmax(logits, dim=-1)
        targets = targets[mask]
        nll = -log_probs.gather(-1, targets.unsqueeze(-1)).sum()
        denominator = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = nll / torch.as_tensor(denominator).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        with torch.no_grad():
            valid = max(int(mask.sum()), 1)
            self._metrics[mode]["entropy"].append(float(-(log_probs.exp() * log_probs).sum()) / valid)
            self._metrics[mode]["mean_token_accuracy"].append(
                float((logits.argmax(-1) == targets).sum()) / valid
            )
        if mode == "train":
            self._total_train_tokens += int(inputs["attention_mask"].sum())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss
