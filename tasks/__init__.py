"""Thin Prefect tasks over lora_core: where, whether and how each stage runs (cache, retries, output
folder)."""

# The one list of the stages a run can recompute, in order, with the name of the task that runs each: the
# flow's `refresh` parameter, the CLI's --refresh choices, the tasks' names and docs/pipeline.md use it.
STAGE_TASKS = {
    "download": "download-data",
    "format": "format-data",
    "split": "split-data",
    "train": "train-lora",
    "evaluate": "evaluate",
    "merge": "merge",
}
STAGES: tuple[str, ...] = tuple(STAGE_TASKS)
