"""What a flow run shows on its Prefect UI page (Artifacts tab): the outcome as Markdown and the sample
replies as a table."""

from __future__ import annotations

import json
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.summary import RunSummary

# one artifact history per key across runs
SUMMARY_KEY, SAMPLES_KEY = ("lora-flow-summary", "lora-flow-samples")


def summary_markdown(s: RunSummary) -> str:
    registry = "registration disabled"
    if s.registered_version:
        registry = f"[{s.registered_model} v{s.registered_version}]({s.version_url}) {s.verdict}".rstrip()
    change = f"{s.perplexity_change_pct:+.1f}%"
    rows = [
        (
            "validation perplexity",
            f"base {s.base_perplexity:.3f} → tuned {s.tuned_perplexity:.3f} ({change})",
        ),
        *(
            (f"behaviour: {k}", f"{v:.0f}" if k.endswith("_n") else f"{v:.3f}")
            for k, v in s.behaviour.items()
        ),
        ("train tokens/s", f"{s.train_tokens_per_second:.1f}"),
        (
            "resumed from",
            f"checkpoint step {s.resumed_from_step}" if s.resumed_from_step else "- (fresh start)",
        ),
        ("MLflow run", f"[{s.mlflow_run_id}]({s.run_url})"),
        ("registry", registry),
        ("adapter", f"`{s.adapter_dir}`"),
        ("merged model", f"`{s.merged_dir}`" if s.merged_dir else "-"),
    ]
    return (
        "# lora-flow run\n\n| measure | value |\n|---|---|\n"
        + "\n".join(f"| {k} | {v} |" for k, v in rows)
        + "\n"
    )


def publish(s: RunSummary) -> RunSummary:
    """Publish the flow's summary `s` as Prefect artifacts; returns `s`."""
    create_markdown_artifact(
        summary_markdown(s), key=SUMMARY_KEY, description="Perplexities, behaviour, MLflow and registry links"
    )
    samples = json.loads(Path(s.samples_path).read_text())
    table = [{k: row[k] for k in ("prompt", "reference", "base", "tuned")} for row in samples]
    create_table_artifact(
        table, key=SAMPLES_KEY, description="Held-out prompts answered by the base and the tuned model"
    )
    return s
