"""Three user-facing messages (issue #31, part 6): a file in another format than data.format is one line
with the fix; conversations cut by train.max_length are counted, logged in one line and kept in the
TrainResult; a hub id that cannot be checked is a note of `validate`, one the hub does not know a refusal."""

import json
import logging
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import REPO

from lora_core import preflight
from lora_core.config import load_recipe
from lora_core.data import DataError, load_normalised

ROLE_TO_SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}
GOOD_DATA = REPO / "data" / "socratic_tutor.jsonl"
SHAREGPT_SHAPE = 'ShareGPT ({"conversations": [{"from", "value"}, ...]})'


def sharegpt(record: dict) -> dict:
    turns = record["messages"]
    return {"conversations": [{"from": ROLE_TO_SHAREGPT[m["role"]], "value": m["content"]} for m in turns]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def recipe(tmp_path, base, data: str, extra: str = ""):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"# lora-flow validate recipe.yaml\nmodel: {{base: '{base}'}}\ndata: {data}\n"
        f"cache_dir: '{tmp_path / 'cache'}'\n{extra}"
    )
    return path


# --------------------------------------------------------------------------- 1. a file in another format


def test_a_sharegpt_file_under_format_messages_is_one_line_with_the_fix(
    tmp_path, tiny_model_dir, tutor_records
):
    path = write_jsonl(tmp_path / "share.jsonl", [sharegpt(r) for r in tutor_records[:12]])

    def problems(data: str) -> list[str]:
        return preflight.check(load_recipe(recipe(tmp_path, tiny_model_dir, data)))

    assert problems(f"{{path: '{path}', format: messages}}") == [
        f"{path}: all 12 records look like {SHAREGPT_SHAPE}, not data.format 'messages'; "
        "set data.format: sharegpt (or auto)"
    ]
    # the fix works
    assert problems(f"{{path: '{path}', format: sharegpt}}") == problems(f"{{path: '{path}'}}") == []


def test_rows_really_wrong_keep_their_line_and_stray_rows_of_another_format_get_one(tmp_path, tutor_records):
    bad_role = {"messages": [{"role": "bot", "content": "hi"}]}
    records = tutor_records[:6] + [sharegpt(r) for r in tutor_records[6:9]] + [bad_role]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    for fmt, like in (
        ("messages", "not data.format 'messages'"),
        ("auto", "not 'messages' like the first record (data.format auto)"),
    ):
        with pytest.raises(DataError) as exc:
            load_normalised(str(path), fmt=fmt)
        assert str(exc.value).splitlines() == [
            f"{path}:10: message 0 has role 'bot'; expected one of system/user/assistant/tool",
            f"{path}:7: this record and 2 more of 10 look like {SHAREGPT_SHAPE}, {like}; convert them to "
            "'messages', or move them to a file of their own in data.mix with format: sharegpt",
        ]


def test_a_mix_source_in_another_format_names_its_own_key(tmp_path, tutor_records):
    from lora_core.config import DataConfig
    from lora_core.data import gather_records

    share = write_jsonl(tmp_path / "share.jsonl", [sharegpt(r) for r in tutor_records[:3]])
    good = write_jsonl(tmp_path / "good.jsonl", tutor_records[:3])
    with pytest.raises(DataError) as exc:
        gather_records(DataConfig(path=str(good), mix=[{"path": str(share), "format": "messages"}]))
    assert str(exc.value) == (
        f"{share}: all 3 records look like {SHAREGPT_SHAPE}, not data.mix[0].format "
        "'messages'; set data.mix[0].format: sharegpt (or auto)"
    )


# --------------------------------------------------------------------------- 2. conversations cut by
# train.max_length


@pytest.fixture(scope="module")
def formatted(tmp_path_factory, tiny_model_dir, tutor_records):
    """16 tutoring conversations (132 to 341 tokens) formatted, split 14/2 and loaded as the train stage loads
    them."""
    import datasets

    from lora_core.config import SplitConfig, TemplateConfig
    from lora_core.data import split_dataset
    from lora_core.data import write_jsonl as write
    from lora_core.formatting import format_dataset

    tmp = tmp_path_factory.mktemp("cut")
    write(tutor_records[:16], tmp / "records.jsonl")
    fmt = format_dataset(
        str(tmp / "records.jsonl"),
        val_records_path=None,
        tokenizer_path=str(tiny_model_dir),
        cfg=TemplateConfig(),
        out_dir=tmp,
    )
    split = split_dataset(fmt.dataset_dir, SplitConfig(val_size=2), tmp / "split")
    return split, datasets.load_from_disk(split.train_dir)


def reply_end(masks: list[int]) -> int:
    """Tokens up to and including the last target token (a trailing newline after end-of-turn is no
    target)."""
    return len(masks) - masks[::-1].index(1)


def test_conversations_cut_by_max_length_are_counted_in_one_warning(formatted, caplog):
    from lora_core.train import check_fits

    _, train = formatted
    masks = train["assistant_masks"]
    longest = max(len(m) for m in masks)
    with caplog.at_level(logging.WARNING, logger="lora_core.train"):
        assert check_fits(train, longest) == 0
        # only the newline after the last end-of-turn goes: no target
        assert check_fits(train, longest - 1) == 0
        assert caplog.records == []
        cut = sum(reply_end(m) > 200 for m in masks)
        assert 0 < cut < len(masks)
        assert check_fits(train, 200) == cut
    longest_cut = max(len(m) for m in masks if reply_end(m) > 200)
    assert [r.getMessage() for r in caplog.records] == [
        f"train.max_length=200 cuts {cut} of {len(masks)} training conversations, losing the end of their "
        "replies "
        f"(longest: {longest_cut} tokens); raise train.max_length to {longest_cut} to train on every reply "
        "whole"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lora_core.train"):
        dropped = sum(1 not in m[:60] for m in masks)
        assert 0 < dropped < len(masks)
        assert check_fits(train, 60) == len(masks)
    assert len(caplog.records) == 1
    assert f", {dropped} of them keep no reply token and are skipped; raise" in caplog.records[0].getMessage()


def test_the_train_result_carries_the_count_and_old_cached_results_still_load(
    formatted, tiny_model_dir, tmp_path
):
    from prefect.serializers import Serializer

    from lora_core.config import LoraConfig, TrainConfig
    from lora_core.train import train_lora
    from tasks.cache import TASK_OPTIONS

    split, train = formatted
    cfg = TrainConfig(max_steps=1, batch_size=2, grad_accum=1, max_length=200, save_steps=1)
    lora = LoraConfig(r=2, alpha=4, dropout=0.0)
    result = train_lora(
        str(tiny_model_dir), split.train_dir, val_dir=None, lora=lora, cfg=cfg, out_dir=tmp_path
    )
    assert result.truncated_conversations == sum(reply_end(m) > 200 for m in train["assistant_masks"]) > 0
    # the cache stores task results as JSON (tasks/cache.py): the field round-trips, and a result cached
    # before it existed loads with the default
    serializer = Serializer(type=TASK_OPTIONS["result_serializer"])
    blob = serializer.dumps(result)
    assert serializer.loads(blob) == result
    old = json.loads(blob)
    del old["data"]["truncated_conversations"]
    assert serializer.loads(json.dumps(old).encode()).truncated_conversations == 0


# --------------------------------------------------------------------------- 3. a hub id for model.base


def test_offline_a_hub_id_not_in_the_cache_is_a_note_not_a_refusal(tmp_path, capsys, mlflow_store):
    from flows.cli import main

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    path = recipe(tmp_path, "someone/does-not-exist", f"{{path: '{GOOD_DATA}'}}")
    note = (
        "model.base 'someone/does-not-exist' not checked: offline (HF_HUB_OFFLINE=1) and not in the local "
        "Hugging Face cache"
    )
    assert preflight.review(load_recipe(path)) == preflight.Review(problems=[], notes=[note])
    assert main(["validate", str(path)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == f"{path}: ok (data {GOOD_DATA}, model someone/does-not-exist), except {note}"


class FakeHub(BaseHTTPRequestHandler):
    """The hub's answers to GET /api/models/<id>[/revision/<rev>]: by repo id, any revision unknown."""

    ANSWERS = {
        "someone/does-not-exist": (404, "RepoNotFound"),
        "someone/down": (503, None),
        "someone/exists": (200, None),
    }

    def do_GET(self):
        repo, _, revision = self.path.partition("/api/models/")[2].partition("/revision/")
        if repo == "someone/silent":  # closes the connection without an answer
            self.close_connection = True
            return
        status, error = (404, "RevisionNotFound") if revision else self.ANSWERS.get(repo, (404, None))
        body = json.dumps({"id": repo}).encode() if status == 200 else b""
        self.send_response(status)
        if error:
            self.send_header("X-Error-Code", error)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_online_the_hub_says_whether_model_base_exists(tmp_path):
    """huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE at import: a subprocess, online, against a fake
    hub."""
    hub = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{hub.server_port}"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    path = recipe(tmp_path, "x/y", f"{{path: '{GOOD_DATA}'}}")
    code = (
        "import json, sys\nfrom lora_core import preflight\nfrom lora_core.config import load_recipe\n"
        "for base in sys.argv[2:]:\n"
        "    name, _, rev = base.partition('@')\n"
        "    overrides = [f'model.base={name}'] + [f'model.revision={rev}'] * bool(rev)\n"
        "    r = preflight.review(load_recipe(sys.argv[1], overrides))\n"
        "    print(json.dumps([r.problems, r.notes]))\n"
    )
    bases = [
        "someone/does-not-exist",
        "someone/exists@v9",
        "someone/down",
        "someone/silent",
        "someone/exists",
    ]
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, str(path), *bases],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
            env={**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")},
        )
    finally:
        hub.shutdown()
    assert out.returncode == 0, out.stderr
    assert [json.loads(line) for line in out.stdout.splitlines()] == [
        [
            [
                f"model.base 'someone/does-not-exist': no such model on the Hugging Face hub ({endpoint}); "
                "check the id, "
                "log in (`hf auth login`) for a gated or private repository, or use a local folder"
            ],
            [],
        ],
        [
            [
                "model.revision 'v9': 'someone/exists' has no such branch, tag or commit on the hub; "
                "fix model.revision or leave it out"
            ],
            [],
        ],
        [[], [f"model.base 'someone/down' not checked: the hub ({endpoint}) answered HTTP 503"]],
        [
            [],
            [
                f"model.base 'someone/silent' not checked: the hub ({endpoint}) cannot be reached "
                "(RemoteProtocolError)"
            ],
        ],
        [[], []],
    ]
