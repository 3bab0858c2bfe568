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
