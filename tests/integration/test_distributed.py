"""Multi-process training on CPU: 2 ranks of `accelerate launch` (torchrun, gloo) train like one process with
the same global batch, log one MLflow curve, write a loadable adapter; a SIGKILLed rank fails the task with
its reason and the re-run resumes from the last checkpoint. Real flows against the Prefect test harness and a
SQLite MLflow store, on the tiny Llama of conftest."""

import json
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

import mlflow
from flows.finetune import finetune
from lora_core.config import load_recipe
from lora_core.launch import RankFailed, accelerate_command, failure_line
from lora_core.train import checkpoint_step, last_checkpoint

# Same data order in both runs (the random sampler's permutation does not depend on the batch size; the
# length-grouped one does), no dropout (each rank would draw its own masks), and a global batch of 20 = the 20
# training conversations, so no step straddles an epoch's end: there accelerate tops up the last rank's short
# micro-batch with conversations from the start (even_batches), which one process never does (measured: 8.9e-4
# relative at step 2 with 16-conversation steps). fp32, so the gap below is summation order alone.
SAME = (
    "group_by_length: false, base_dtype: float32, dtype: float32, learning_rate: 1.0e-2, "
    "max_steps: 6, save_steps: 3, eval_steps: 3, grad_accum: 2"
)
NO_DROPOUT = "lora: {dropout: 0.0}\n"
# 1 x 10 vs 2 x 5 conversations per micro-batch: fp32 sums in another order, each rank padding its micro-batch
# to its own longest row (masked out of the loss). Measured: 8.0e-8 relative at most over the 6 steps. Ranks
# whose gradients are not averaged (the compact CPU loss bypassing DistributedDataParallel did that) drift by
# 2.4e-4 at step 6, a wrong global batch by more: 1e-5 catches both and leaves room for other CPUs' kernels.
LOSS_RTOL = 1e-5


def losses(adapter_dir: str) -> dict[int, float]:
    rows = map(
        json.loads, (Path(adapter_dir).parent / "checkpoints" / "metrics.jsonl").read_text().splitlines()
    )
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(prefect_harness, make_recipe, mlflow_store):
    recipe = make_recipe("ddp", train="{" + SAME + ", batch_size: 10}", extra=NO_DROPOUT)
    started = time.perf_counter()
    one = finetune(config=load_recipe(recipe))
    one_s = time.perf_counter() - started
    two = finetune(config=load_recipe(recipe, ["train.batch_size=5", "train.num_processes=2"]))
    two_s = time.perf_counter() - started - one_s
    single, ranks = losses(one.adapter_dir), losses(two.adapter_dir)
    assert list(ranks) == list(range(1, 7)) and list(single) == list(ranks)
    worst = max(abs(ranks[s] - single[s]) / single[s] for s in single)
    print(
        f"\n1 process {one_s:.0f} s, 2 processes {two_s:.0f} s; losses {single} vs {ranks}; worst relative "
        f"gap {worst:.2e}"
    )
    assert worst < LOSS_RTOL
    assert single[6] < single[1]  # it learned: the comparison is not between two flat curves

    # the main rank logged one curve into the flow's MLflow run, every step once
    mlflow.set_tracking_uri(mlflow_store)
    client = MlflowClient()
    assert [m.step for m in client.get_metric_history(two.mlflow_run_id, "loss")] == list(range(1, 7))
    assert len(client.search_runs([client.get_experiment_by_name("ddp").experiment_id])) == 2

    # the adapter loads on the base and matches the single-process one to training precision
    a, b = (load_file(Path(s.adapter_dir) / "adapter_model.safetensors") for s in (one, two))
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(load_recipe(recipe).model.base)
    tuned = PeftModel.from_pretrained(base, two.adapter_dir)
    ids = torch.tensor([[1, 5, 9, 2]])
    assert torch.isfinite(tuned(input_ids=ids).logits).all()


def _kill_a_rank_after(root: Path, step: int, killed: dict, timeout: float = 300) -> None:
    """SIGKILL rank 1 of this process's `accelerate launch` once a checkpoint at `step` or later exists."""
    deadline = time.time() + timeout
    while time.time() < deadline and not killed:
        ckpts = [last_checkpoint(d) for d in root.glob("outputs/*/train/*/checkpoints")]
        if any(c and checkpoint_step(c) >= step for c in ckpts):
            for proc in psutil.Process().children(recursive=True):
                try:
                    if "flows.launch" in proc.cmdline() and proc.environ().get("RANK") == "1":
                        proc.send_signal(signal.SIGKILL)
                        killed["pid"] = proc.pid
                except psutil.NoSuchProcess:
                    continue
        time.sleep(0.1)


@pytest.mark.slow
def test_a_killed_rank_fails_the_task_and_the_rerun_resumes(
    prefect_harness, make_recipe, mlflow_store, in_tmp_cwd
):
    train = (
        "{max_steps: 200, save_steps: 10, save_total_limit: 3, batch_size: 2, grad_accum: 1, "
        "learning_rate: 1.0e-2, eval_steps: 100, num_processes: 2}"
    )
    recipe = make_recipe("rank-kill", train=train)
    killed: dict = {}
    killer = threading.Thread(target=_kill_a_rank_after, args=(in_tmp_cwd, 20, killed), daemon=True)
    killer.start()
    with pytest.raises(RankFailed, match=r"a training rank failed: .*(Signal 9|SIGKILL)"):
        finetune(config=load_recipe(recipe))
    killer.join(timeout=5)
    assert killed, "no rank was killed: the run finished first"
    (train_dir,) = in_tmp_cwd.glob("outputs/rank-kill/train/*")
    killed_at = checkpoint_step(last_checkpoint(train_dir / "checkpoints"))
    assert killed_at >= 20

    again = finetune(config=load_recipe(recipe))
    assert again.resumed_from_step == killed_at
    mlflow.set_tracking_uri(mlflow_store)
    client = MlflowClient()
    # the same run, continued
    (run,) = client.search_runs([client.get_experiment_by_name("rank-kill").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["lora_flow.resumed"] == "true"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 201))


def test_the_launch_command_runs_torchrun_ranks_on_cpu():
    cmd = accelerate_command(
        2, config_file=None, cuda=False, entry="flows.launch", args_path="a.json", port=29999
    )
    # `--cpu --num_processes 2` would start one process: the multi-process launcher is the torchrun one
    assert "--cpu" not in cmd and "--multi_gpu" in cmd and cmd[-3:] == ["-m", "flows.launch", "a.json"]
    assert (
        cmd[cmd.index("--num_processes") + 1] == "2" and cmd[cmd.index("--main_process_port") + 1] == "29999"
    )
    with_file = accelerate_command(
        4, config_file="fsdp.yaml", cuda=True, entry="flows.launch", args_path="a.json"
    )
    assert with_file[with_file.index("--config_file") + 1] == "fsdp.yaml" and "--multi_gpu" not in with_file


def test_the_failure_line_is_the_rank_error_not_the_launcher_noise():
    tail = [
        "[rank1]: Traceback (most recent call last):",
        '[rank1]:   File "x.py", line 3',
        "[rank1]: MemoryError: out of memory",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
        "flows.launch FAILED",
        "",
    ]
    assert failure_line(tail) == "[rank1]: MemoryError: out of memory"
    assert failure_line(["  exitcode  : -9 (pid: 12)", "  error_file: <N/A>"]) == "exitcode  : -9 (pid: 12)"
    # a killed rank is the cause; the survivor's gloo "Connection reset by peer" is its consequence
    both = [
        "[rank0]: RuntimeError: [pair.cc:537] Read error [127.0.0.1]:29096: Connection reset by peer.",
        "failed (exitcode: -9) local_rank: 1 (pid: 20172) of binary: python",
        "traceback : Signal 9 (SIGKILL) received by PID 20172",
    ]
    assert failure_line(both) == "traceback : Signal 9 (SIGKILL) received by PID 20172"
    assert failure_line(both[:2]) == "failed (exitcode: -9) local_rank: 1 (pid: 20172) of binary: python"
