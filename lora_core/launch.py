"""Multi-process training: `train_lora` in every rank of an `accelerate launch`.

`train_on_ranks` (the caller's side) starts `accelerate launch -m <entry> <json>` and waits; each rank runs
`main()` here (or an entry point that adds callbacks, such as flows/launch.py's MLflow metrics), which calls
the same `train.train_lora` as a single-process run. The Trainer does the rest: gradients are all-reduced
(NCCL on GPUs, gloo on CPU), only the main process writes checkpoints, metrics and the adapter, and a resume
starts from the newest complete checkpoint, so a rank killed mid-run costs at most `save_steps` steps on the
next try.

On CPU, `accelerate launch --cpu --num_processes 2` starts ONE process (its simple launcher ignores the count:
measured with accelerate 1.15). Several CPU ranks go through torchrun (`--multi_gpu`), and they join a gloo
group because the Trainer's `use_cpu` builds the accelerate state with cpu=True.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from lora_core.config import LoraConfig, TrainConfig
from lora_core.errors import LoraFlowError

log = logging.getLogger(__name__)

ERROR_MARK = "lora-flow error: "  # a rank refusing bad input prints this line, so the caller refuses it too
TAIL_LINES = 200  # output lines kept to explain a failed launch


class LaunchError(LoraFlowError):
    """Bad input reported by a training rank (not worth a retry), or an accelerate config file that is
    missing."""


class RankFailed(RuntimeError):
    """A training rank died (killed, out of memory, a crash): transient, a retry resumes from the last
    checkpoint."""


def free_port() -> int:
    """A TCP port nobody listens on, for the ranks' rendezvous (a fixed 29500 clashes with any other
    launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(
    num_processes: int,
    *,
    config_file: str | None,
    cuda: bool,
    entry: str,
    args_path: str,
    port: int | None = None,
) -> list[str]:
    """The `accelerate launch` command line; on CPU each rank gets an equal share of the cores as torch
    threads."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    if config_file:
        cmd += ["--config_file", config_file]
    else:  # without a config file accelerate warns about each default: name them
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if num_processes > 1:
            cmd += ["--multi_gpu"]  # torchrun; on CPU too (see the module docstring)
        cmd += ["--main_process_port", str(port or free_port())]
    if not cuda:
        threads = max(1, (os.cpu_count() or 1) // num_processes)
        cmd += ["--num_cpu_threads_per_process", str(threads)]
    return [*cmd, "-m", entry, args_path]


def failure_line(tail: list[str]) -> str:
    """The line that says why a launch failed: torchrun's report of a rank killed by a signal (the other
    ranks' errors are then only its consequence: a peer's connection reset), else a rank's exception
    (`SomeError: ...`), else torchrun's report of an exit code, else the last line printed."""
    lines = [line.strip() for line in tail if line.strip()]
    killed = [line for line in lines if re.search(r"Signal \d+|exitcode\s*:\s*-\d+", line)]
    if killed:
        return killed[-1]
    errors = [
        line
        for line in lines
        if re.search(r"(^|[\s\]:])[\w.]+(Error|Exception|Interrupt): ", line + " ")
        and "ChildFailedError" not in line
    ]
    if errors:
        return errors[-1]
    signals = [line for line in lines if re.search(r"Signal \d+|exitcode|exit code", line)]
    return (signals or lines or ["no output"])[-1]


def train_on_ranks(
    entry: str, cfg: TrainConfig, env: dict[str, str] | None = None, cwd: str | None = None, **train_kwargs
):
    """Run `train_lora(**train_kwargs, lora=..., cfg=cfg)` in `cfg.num_processes` ranks of `accelerate launch
    -m entry`; returns the main rank's TrainResult. A rank's bad-input error raises LaunchError; any other
    death RankFailed, with the rank's last error line."""
    import torch

    from lora_core.train import TrainResult

    if cfg.accelerate_config and not Path(cfg.accelerate_config).is_file():
        raise LaunchError(
            f"train.accelerate_config={cfg.accelerate_config}: no such file; write one with `accelerate "
            "config` "
            "or unset it"
        )
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="lora-flow-launch-") as tmp:
        args_path, result_path = Path(tmp) / "args.json", Path(tmp) / "result.json"
        plain = {
            k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v for k, v in train_kwargs.items()
        }
        args_path.write_text(
            json.dumps({**plain, "cfg": cfg.model_dump(mode="json"), "result_path": str(result_path)})
        )
        cmd = accelerate_command(
            cfg.num_processes,
            config_file=cfg.accelerate_config,
            cuda=cuda,
            entry=entry,
            args_path=str(args_path),
        )
        log.info("training on %d processes: %s", cfg.num_processes, " ".join(cmd))
        tail = _run(cmd, {**os.environ, **(env or {})}, cwd)
        if tail is not None:
            marked = [line.split(ERROR_MARK, 1)[1].strip() for line in tail if ERROR_MARK in line]
            if marked:
                raise LaunchError(marked[-1])
            raise RankFailed(f"a training rank failed: {failure_line(tail)}")
        return TrainResult(**json.loads(result_path.read_text()))


def _run(cmd: list[str], env: dict, cwd: str | None) -> list[str] | None:
    """Run the launch, echoing its output to stderr live; None on success, else the last output lines."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    with subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as proc:
        assert proc.stdout is not None  # stdout=PIPE
        for line in proc.stdout:
            sys.stderr.write(line)
            tail.append(line)
    return None if proc.returncode == 0 else list(tail)


def main(argv: list[str] | None = None, callbacks: list | None = None) -> None:
    """One rank: `python -m lora_core.launch ARGS.json` under `accelerate launch` (callbacks: main rank
    only)."""
    from lora_core.train import train_lora

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s rank " + os.environ.get("RANK", "0") + " %(name)s: %(message)s",
    )
    args = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    result_path = args.pop("result_path")
    args["lora"], args["cfg"] = LoraConfig(**args["lora"]), TrainConfig(**args["cfg"])
    try:
        result = train_lora(**args, callbacks=callbacks)
    except LoraFlowError as exc:  # bad input: one line the caller recognises, no retry
        print(f"{ERROR_MARK}{exc}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None
    if int(os.environ.get("RANK", "0")) == 0:
        Path(result_path).write_text(json.dumps(dataclasses.asdict(result)))


if __name__ == "__main__":
    main()
