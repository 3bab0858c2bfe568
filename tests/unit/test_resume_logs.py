"""After a resume, training/metrics.jsonl holds each step once: what the interrupted session logged past
its last checkpoint is replaced by the resumed session's lines."""

import json
import shutil

from lora_core.config import LoraConfig, SplitConfig, TemplateConfig, TrainConfig
from lora_core.data import split_dataset, write_jsonl
from lora_core.formatting import format_dataset
from lora_core.train import train_lora


def test_resumed_training_logs_each_step_once(tmp_path, tiny_model_dir, tutor_records):
    write_jsonl(tutor_records[:12], tmp_path / "records.jsonl")
    fmt = format_dataset(
        str(tmp_path / "records.jsonl"),
        val_records_path=None,
        tokenizer_path=str(tiny_model_dir),
        cfg=TemplateConfig(),
        out_dir=tmp_path,
    )
    split = split_dataset(fmt.dataset_dir, SplitConfig(val_size=2), tmp_path / "split")
    cfg = TrainConfig(
        max_steps=4, batch_size=4, grad_accum=1, save_steps=2, save_total_limit=2, logging_steps=1
    )
    lora = LoraConfig(r=4, alpha=8, dropout=0.0)
    first = train_lora(
        str(tiny_model_dir), split.train_dir, val_dir=None, lora=lora, cfg=cfg, out_dir=tmp_path / "run"
    )
    # as if killed after logging step 4 but before its checkpoint was complete, mid-way through a line
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "checkpoint-4")
    with open(first.metrics_path, "a") as f:
        f.write('{"step": 5, "lo')
    again = train_lora(
        str(tiny_model_dir), split.train_dir, val_dir=None, lora=lora, cfg=cfg, out_dir=tmp_path / "run"
    )
    assert again.resumed_from_step == 2
    entries = [json.loads(line) for line in open(again.metrics_path)]
    assert [e["step"] for e in entries if "loss" in e] == [1, 2, 3, 4]
    assert len([e for e in entries if "train_loss" in e]) == 1  # the end summary
