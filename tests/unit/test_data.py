import json

import pytest

from lora_core.config import DataConfig, SplitConfig
from lora_core.data import (
    DataError,
    detect_format,
    gather_records,
    load_normalised,
    normalise,
    source_fingerprint,
    split_indices,
)


def jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello?"}]}


def test_formats_are_detected_and_normalised_to_messages():
    share = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    alpaca = {"instruction": "Add", "input": "2 and 3", "output": "What is 2 + 3?"}
    assert [detect_format(r) for r in (CHAT, share, alpaca, {"text": "t"})] == [
        "messages",
        "sharegpt",
        "alpaca",
        "text",
    ]
    assert normalise(share, "sharegpt")[0] == {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    }
    rec, err = normalise(alpaca, "alpaca")
    assert err is None and rec["messages"][0]["content"] == "Add\n\n2 and 3"
    assert normalise({"text": "t"}, "text")[0] == {"text": "t"}


def test_tool_messages_and_tool_calls_pass_through():
    call = [{"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]
    rec, err = normalise(
        {
            "messages": [
                {"role": "user", "content": "1+?"},
                {"role": "assistant", "content": "", "tool_calls": call},
                {"role": "tool", "content": "2"},
                {"role": "assistant", "content": "2"},
            ],
            "tools": [{"type": "function", "function": {"name": "add"}}],
        },
        "messages",
    )
    assert err is None and rec["messages"][1]["tool_calls"] == call and rec["tools"]


def test_every_bad_record_is_reported_with_file_line_and_fix(tmp_path):
    p = jsonl(
        tmp_path,
        [
            CHAT,
            '{"messages": [oops',
            {"messages": [{"role": "user", "content": "q"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
        ],
    )
    with pytest.raises(DataError) as exc:
        load_normalised(str(p))
    lines = str(exc.value).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"{p}:2: not valid JSON") and "fix or remove the line" in lines[0]
    assert lines[1].startswith(f"{p}:3: conversation has no assistant message")
    assert lines[2] == f"{p}:4: message 1 has role 'bot'; expected one of system/user/assistant/tool"


def test_empty_dataset_and_missing_path(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"e.jsonl: dataset is empty"):
        load_normalised(str(empty))
    with pytest.raises(DataError, match=r"no such file or directory; set data.path"):
        load_normalised(str(tmp_path / "nope.jsonl"))


def test_csv_parquet_json_and_directory(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"instruction": ["a", "b"], "output": ["x?", "y?"]})
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(df.to_dict("records")))
    for name in ("d.csv", "d.parquet", "d.json"):
        recs, fmt, digest = load_normalised(str(tmp_path / name))
        assert fmt == "alpaca" and len(recs) == 2 and len(digest) == 64
    recs, _, _ = load_normalised(str(tmp_path))
    assert len(recs) == 6


def test_content_hash_follows_bytes_not_path(tmp_path):
    p = jsonl(tmp_path, [CHAT])
    before = source_fingerprint(DataConfig(path=str(p)))
    assert before == source_fingerprint(DataConfig(path=str(p)))
    p.write_text(p.read_text().replace("hello", "hellO"))
    assert source_fingerprint(DataConfig(path=str(p))) != before


def test_split_is_deterministic_disjoint_and_sized():
    keys = [f"k{i}" for i in range(50)]
    a = split_indices(keys, 0.2, None, seed=1)
    assert a == split_indices(keys, 0.2, None, seed=1)
    assert a != split_indices(keys, 0.2, None, seed=2)
    train, val = a
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == list(range(50))
    assert len(split_indices(keys, 0.2, 7, seed=1)[1]) == 7


def test_duplicates_never_straddle_the_split():
    keys = ["a", "a", "b", "c", "c", "c", "d", "e"]
    for seed in range(10):
        train, val = split_indices(keys, 0.3, None, seed)
        assert not {keys[i] for i in train} & {keys[i] for i in val}


def test_split_that_leaves_no_training_data_is_refused():
    with pytest.raises(DataError, match="leave at least one for training"):
        split_indices(["a", "b"], 0.5, 2, 0)


def test_split_sizes_count_distinct_conversations():
    keys = ["a"] * 5 + ["b", "c", "d"]
    for seed in range(10):  # always 2 distinct validation conversations, however many copies come along
        train, val = split_indices(keys, 0.1, 2, seed)
        assert len({keys[i] for i in val}) == 2 and len({keys[i] for i in train}) == 2
    with pytest.raises(DataError) as exc:  # 6 records would allow 3, the 2 distinct conversations do not
        split_indices(["a"] * 5 + ["b"], 0.1, 3, 0)
    assert str(exc.value) == (
        "split.val_size asks for 3 validation conversations out of 2 distinct ones (6 records; identical "
        "conversations "
        "stay on one side of the split); leave at least one for training: set split.val_size to at most 1, "
        "or add data"
    )
    with pytest.raises(
        DataError,
        match=r"^split.val_fraction asks for 1 validation conversations out of 1 distinct .*add distinct",
    ):
        split_indices(["a", "a"], 0.5, None, 0)


def test_trailing_blank_lines_and_a_utf8_byte_order_mark_are_accepted(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + (json.dumps(CHAT) + "\r\n" + json.dumps(CHAT) + "\r\n\r\n  \n").encode())
    assert len(load_normalised(str(p))[0]) == 2


def test_blank_lines_inside_a_jsonl_file_are_one_problem_per_run(tmp_path):
    p = jsonl(tmp_path, [CHAT, "", "  ", CHAT, "", CHAT])
    with pytest.raises(DataError) as exc:
        load_normalised(str(p))
    assert [line.split(" blank")[0] for line in str(exc.value).splitlines()] == [
        f"{p}:2: lines 2-3 are",
        f"{p}:5: line 5 is",
    ]


def test_missing_content_is_refused_except_beside_tool_calls():
    call = [{"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]
    ok = {
        "messages": [
            {"role": "user", "content": "1+?"},
            {"role": "assistant", "tool_calls": call},
            {"role": "tool", "content": "2"},
            {"role": "assistant", "content": "2"},
        ]
    }
    assert normalise(ok, "messages")[1] is None
    for bad in ({"role": "user"}, {"role": "user", "content": None}):
        _, err = normalise({"messages": [bad, CHAT["messages"][1]]}, "messages")
        assert err.startswith("message 0 (user) has no 'content'; add \"content\"")


def test_file_level_problems_name_the_file_and_the_fix(tmp_path):
    lines = json.dumps(CHAT) + "\n" + json.dumps(CHAT) + "\n"
    (tmp_path / "l.json").write_text(lines)
    with pytest.raises(
        DataError,
        match=r"l.json:2: not valid JSON \(Extra data\); it looks like JSON Lines: rename it to .jsonl",
    ):
        load_normalised(str(tmp_path / "l.json"))
    (tmp_path / "p.parquet").write_text(lines)
    with pytest.raises(DataError, match=r"p.parquet: not a Parquet file \(no PAR1 header\)"):
        load_normalised(str(tmp_path / "p.parquet"))
    (tmp_path / "u.csv").write_bytes("instruction,output\nA,B\n".encode("utf-16"))
    with pytest.raises(DataError, match=r"u.csv: UTF-16-LE text .* save the file as UTF-8"):
        load_normalised(str(tmp_path / "u.csv"))


def test_gather_reports_every_source_at_once(tmp_path):
    good = jsonl(tmp_path, [CHAT], "good.jsonl")
    bad = jsonl(tmp_path, [CHAT, '{"messages": [oops'], "bad.jsonl")
    text = jsonl(tmp_path, [{"text": "plain"}], "text.jsonl")
    cfg = DataConfig(
        path=str(bad),
        mix=[{"path": str(good)}, {"path": str(text)}],
        validation_path=str(tmp_path / "nope.jsonl"),
    )
    with pytest.raises(DataError) as exc:
        gather_records(cfg)
    lines = str(exc.value).splitlines()
    assert (
        len(lines) == 2
        and lines[0].startswith(f"{bad}:2: not valid JSON")
        and "nope.jsonl: no such file" in lines[1]
    )
    with pytest.raises(
        DataError, match=r"^data.mix\[1\] .*text.jsonl: text records cannot be mixed with messages records"
    ):
        gather_records(DataConfig(path=str(good), mix=[{"path": str(good)}, {"path": str(text)}]))
    g = gather_records(
        DataConfig(path=str(good), mix=[{"path": str(good), "weight": 2}], validation_path=str(good))
    )
    assert len(g.records) == 3 and g.val_records == [CHAT] and g.format == "messages"


def test_split_config_bounds():
    with pytest.raises(Exception, match="less than 1"):
        SplitConfig(val_fraction=1.5)


def test_split_of_an_arrow_column_matches_the_split_of_a_list():
    import pyarrow as pa

    keys = [f"k{i % 37}" for i in range(200)]  # duplicates among them
    for seed in range(3):
        assert split_indices(pa.chunked_array([keys[:90], keys[90:]]), 0.2, None, seed) == split_indices(
            keys, 0.2, None, seed
        )


def test_records_head_reads_only_the_first_rows_and_counts_them_all(tmp_path):
    from lora_core.data import records_head

    path = tmp_path / "train_records.jsonl"
    path.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": str(i)}]}) + "\n" for i in range(25))
    )
    df, total = records_head(path, rows=10)
    assert (len(df), total) == (10, 25)
    assert json.loads(df["messages"][3]) == [{"role": "user", "content": "3"}]  # nested values as JSON text
    assert records_head(path)[0].equals(records_head(path, rows=100)[0]) and len(records_head(path)[0]) == 25


def test_plain_chats_read_by_pyarrow_match_the_slow_path(tmp_path, monkeypatch):
    """lora_core/fastjsonl.py: same rows, records, keys and problems as the per-record path."""
    import json

    from lora_core import streaming

    texts = ["plain", 'a "quote" \\ and\nnew\r\tline', "é", "😀", "\u3000", " ", "ctl\x01", "del\x7f"]
    lines = []
    for i in range(400):
        msgs = [{"role": "system", "content": texts[i % 3]}] if i % 5 == 0 else []
        roles = ("user", "assistant", "tool" if i % 7 else "bogus", "assistant")
        msgs += [{"role": roles[k], "content": texts[(i + k) % 8]} for k in range(1 + i % 4)]
        lines.append(json.dumps({"messages": msgs} if i % 17 else {}, ensure_ascii=bool(i % 2)))
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def read(fast: bool):
        if not fast:
            monkeypatch.setattr(streaming, "plain_chats", lambda *a, **k: None)
        work = tmp_path / f"work-{fast}"
        work.mkdir()
        n = streaming.normalised(str(path), "messages", work=work, system_prompt='Be "kind" é')
        return n.ds.to_dict(), n.format, n.problems, n.n_bad

    fast = read(True)
    assert fast[3] and fast[3] < 400  # some records go the fast way, some have problems
    assert fast == read(False)
