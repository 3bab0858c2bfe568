"""The summary a fine-tune run returns: one typed model, read by the CLI, the Prefect report and the sweep."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Promotion(BaseModel):
    """The champion gate's decision for this run's version."""

    model_config = ConfigDict(frozen=True)

    promoted: bool
    reason: str


class RunSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    mlflow_run_id: str
    tracking_uri: str
    run_url: str  # the run's page in the MLflow UI
    ui_command: str  # the command that opens that UI on this tracking store
    base_perplexity: float
    tuned_perplexity: float
    perplexity_change_pct: float  # 100 * (tuned - base) / base
    behaviour: dict[str, float]  # {"base.<metric>": x, "tuned.<metric>": y}
    train_tokens_per_second: float  # the figure logged under that name
    resumed_from_step: int  # 0: a fresh start
    adapter_dir: str
    merged_dir: str | None  # None: merge disabled (or a full fine-tune, which needs none)
    samples_path: str
    latest_dir: str  # <output>/<recipe>/latest: stable links to this run's results
    registered_model: str | None = None  # None: registration disabled
    registered_version: str | None = None
    version_url: str | None = None
    promotion: Promotion | None = None  # None: registry.promote off, or decided by an earlier run

    @property
    def verdict(self) -> str:
        """The champion gate's outcome in words ("" when no decision was made by this run)."""
        p = self.promotion
        if p is None:
            return ""
        return f"champion ({p.reason})" if p.promoted else f"champion kept ({p.reason})"


def behaviour_lines(behaviour: dict[str, float]) -> list[str]:
    """'<share>: base k/n (p%) -> tuned k/n (p%, 95% CI low-high%)' for each headline share."""
    from lora_core.behavior import share_counts, wilson_interval

    def view(which: str) -> dict[str, float]:
        return {k.removeprefix(which): v for k, v in behaviour.items() if k.startswith(which)}

    base, tuned = share_counts(view("base.")), share_counts(view("tuned."))
    lines = []
    for name, (k, n) in tuned.items():
        low, high = wilson_interval(k, n)
        b = f"{base[name][0]}/{base[name][1]} ({base[name][0] / base[name][1]:.0%})" if name in base else "-"
        lines.append(f"{name}: base {b} -> tuned {k}/{n} ({k / n:.0%}, 95% CI {low:.0%}-{high:.0%})")
    return lines


def summary_text(s: RunSummary) -> str:
    """What `lora-flow run` prints when the flow is done."""
    resumed = f" (resumed from step {s.resumed_from_step})" if s.resumed_from_step else ""
    registered = "(registration disabled)"
    if s.registered_version:
        registered = f"version {s.registered_version}" + (f" -> {s.verdict}" if s.verdict else "")
    change = f"{s.perplexity_change_pct:+.1f}%"
    rows = [
        ("MLflow run", f"{s.mlflow_run_id}{resumed}"),
        (
            "validation perplexity",
            f"base {s.base_perplexity:.3f} -> tuned {s.tuned_perplexity:.3f} ({change})",
        ),
        *(("behaviour", line) for line in behaviour_lines(s.behaviour)),
        ("adapter", s.adapter_dir),
        ("merged model", s.merged_dir or "(merge disabled)"),
        ("registry", registered),
        ("samples", s.samples_path),
        ("open the MLflow UI", s.ui_command),
    ]
    return "\n==== lora-flow: done ====\n" + "".join(f"{k + ':':<23}{v}\n" for k, v in rows)
