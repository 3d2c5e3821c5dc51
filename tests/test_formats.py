"""Row formats -> canonical records: detection, conversion, file readers, bad rows, real samples."""
from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from tinygpt.data.formats import (Conversation, Message, Preference, Unpaired, detect_format,
                                  detect_preference_format, format_instruction, load_preferences,
                                  load_sft, load_unpaired, to_conversation, to_preference)
from tinygpt.data.prompts import load_prompts
from conftest import SHARED_DATA as DATA
from tinygpt.data.rows import SkippedRowsWarning, read_rows
from tinygpt.errors import DataError, UserError


def real(rel: str) -> Path:
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"shared data not present: {rel}")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def roles(messages):
    return [m.role for m in messages]


U, A, S = "user", "assistant", "system"

# ---- SFT detection and conversion --------------------------------------------------------------
SFT_CASES = {
    "instruction_response": ({"instruction": "Name a fruit.", "response": "Apple."},
                             [(U, "Name a fruit."), (A, "Apple.")]),
    "dolly": ({"instruction": "Summarise.", "context": "Cats sleep a lot.", "response": "Sleepy cats.",
               "category": "summarization"},
              [(U, "Summarise.\n\nCats sleep a lot."), (A, "Sleepy cats.")]),
    "alpaca": ({"instruction": "Translate to French.", "input": "cat", "output": "chat"},
               [(U, "Translate to French.\n\ncat"), (A, "chat")]),
    "lima": ({"instruction": "And 3+3?", "input": "", "output": "6",
              "history": [["1+1?", "2"], ["2+2?", "4"]]},
             [(U, "1+1?"), (A, "2"), (U, "2+2?"), (A, "4"), (U, "And 3+3?"), (A, "6")]),
    "sharegpt": ({"conversations": [{"from": "system", "value": "Be kind."},
                                    {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                    {"from": "user", "value": "Bye"}, {"from": "chatgpt", "value": "Ciao"}]},
                 [(S, "Be kind."), (U, "Hi"), (A, "Hello"), (U, "Bye"), (A, "Ciao")]),
    "messages": ({"messages": [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Q"},
                               {"role": "assistant", "content": "R"}]},
                 [(S, "Sys"), (U, "Q"), (A, "R")]),
    "prompt_completion": ({"prompt": "The sky is", "completion": " blue."},
                          [(U, "The sky is"), (A, " blue.")]),
}


@pytest.mark.parametrize("fmt", sorted(SFT_CASES))
def test_detect_and_convert_each_sft_format(fmt):
    row, expected = SFT_CASES[fmt]
    assert detect_format(row) == fmt
    conv = to_conversation(row, fmt)
    assert isinstance(conv, Conversation)
    assert [(m.role, m.content) for m in conv.messages] == expected


def test_format_instruction_joins_input_with_blank_line():
    assert format_instruction("Do it.") == "Do it."
    assert format_instruction("Do it.", "") == "Do it."
    assert format_instruction("Do it.", "  \n") == "Do it."
    assert format_instruction("Do it.", "data") == "Do it.\n\ndata"


def test_alpaca_system_field_and_missing_input():
    conv = to_conversation({"instruction": "Hi", "output": "Yo", "system": "Terse."}, "alpaca")
    assert [(m.role, m.content) for m in conv.messages] == [(S, "Terse."), (U, "Hi"), (A, "Yo")]


def test_sharegpt_tidying_leading_assistant_merges_and_trailing_user():
    row = {"conversations": [{"from": "gpt", "value": "orphan"}, {"from": "human", "value": "a"},
                             {"from": "human", "value": "b"}, {"from": "bard", "value": "c"},
                             {"from": "human", "value": "dangling"}]}
    conv = to_conversation(row, "sharegpt")
    assert [(m.role, m.content) for m in conv.messages] == [(U, "a\n\nb"), (A, "c")]


def test_sharegpt_tool_turns_are_folded_and_tools_go_to_system():
    row = {"tools": '[{"name": "f"}]',
           "conversations": [{"from": "human", "value": "call f"},
                             {"from": "function_call", "value": '{"name": "f"}'},
                             {"from": "observation", "value": '{"ok": 1}'},
                             {"from": "gpt", "value": "done"}]}
    conv = to_conversation(row, "sharegpt")
    assert roles(conv.messages) == [S, U, A, U, A]
    assert conv.messages[0].content == 'Tools:\n[{"name": "f"}]'
    assert conv.messages[2].content == '{"name": "f"}' and conv.messages[3].content == '{"ok": 1}'


def test_messages_with_text_parts():
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                        {"role": "assistant", "content": "c"}]}
    assert to_conversation(row, "messages").messages[0].content == "ab"


@pytest.mark.parametrize("fmt,row,reason", [
    ("alpaca", {"instruction": "x"}, "missing field 'output'"),
    ("alpaca", {"instruction": "x", "output": "   "}, "empty"),
    ("alpaca", {"instruction": "x", "output": 42}, "must be text, got int"),
    ("alpaca", {"instruction": 7, "output": "y"}, "must be text"),
    ("sharegpt", {"conversations": [{"from": "gpt", "value": "only me"}]}, "no assistant reply"),
    ("sharegpt", {"conversations": [{"from": "alien", "value": "x"}]}, "unknown role"),
    ("sharegpt", {"conversations": "hi"}, "list of messages"),
    ("messages", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, "empty"),
    ("lima", {"instruction": "q", "output": "a", "history": [["only one"]]}, "pair"),
])
def test_bad_rows_raise_value_error(fmt, row, reason):
    with pytest.raises(ValueError, match=reason):
        to_conversation(row, fmt)


def test_detect_format_unknown_row():
    with pytest.raises(ValueError, match="unrecognised"):
        detect_format({"text": "just text"})


# ---- readers -----------------------------------------------------------------------------------
ALPACA_ROWS = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]


def test_readers_all_file_types_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ALPACA_ROWS) + "\n\n", encoding="utf-8")
    (tmp_path / "a.json").write_text(json.dumps(ALPACA_ROWS, indent=2), encoding="utf-8")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in ALPACA_ROWS))
    with gzip.open(tmp_path / "a.json.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(ALPACA_ROWS))
    pq.write_table(pa.Table.from_pylist(ALPACA_ROWS), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.json", "a.jsonl.gz", "a.json.gz", "a.parquet"):
        rows = list(read_rows(tmp_path / name))
        assert [r for _, r in rows] == ALPACA_ROWS, name
        assert [n for n, _ in rows] == [1, 2, 3], name
        convs, report = load_sft(tmp_path / name)
        assert report.n_skipped == 0 and [c.messages[-1].content for c in convs] == ["a0", "a1", "a2"]


def test_parquet_nested_conversations(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    convs, _ = load_sft(tmp_path / "c.parquet")
    assert [(m.role, m.content) for m in convs[0].messages] == [(U, "hi"), (A, "yo")]


def test_json_file_holding_json_lines(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text("\n".join(json.dumps(r) for r in ALPACA_ROWS), encoding="utf-8")
    assert len(load_sft(path)[0]) == 3


def test_jsonl_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('\n{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert [n for n, _ in read_rows(path)] == [2, 4]


@pytest.mark.parametrize("content,line,what", [
    (b'{"instruction": "q", "output": "a"}\n{"instruction": oops}\n', 2, "invalid JSON"),
    (b'{"instruction": "q", "output": "a"}\n{"instruction": "\xff\xfe"}\n', 2, "invalid UTF-8"),
    (b'{"instruction": "q", "output": "a"}\n[1, 2]\n', 2, "not an object"),
])
def test_reader_errors_name_file_and_line(tmp_path, content, line, what):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=what) as info:
        load_sft(path)
    assert info.value.line == line and f"{path}:{line}" in str(info.value)


def test_json_array_errors(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"instruction": "q", "output": "a"},\n{"instruction": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match="invalid JSON") as info:
        list(read_rows(path))
    assert info.value.line == 3
    path.write_text('[{"instruction": "q", "output": "a"}, "text"]', encoding="utf-8")
    with pytest.raises(DataError, match="not an object") as info:
        list(read_rows(path))
    assert info.value.line == 2


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match="not found") as info:
        load_sft(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(info.value)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported") as info:
        load_sft(tmp_path / "data.csv")
    assert ".jsonl" in str(info.value) and ".parquet" in str(info.value)


# ---- loaders: bad rows, skipping, overrides ----------------------------------------------------
BAD_FILE_ROWS = [
    {"instruction": "fine", "input": "", "output": "ok"},
    {"instruction": "missing output", "input": ""},
    {"instruction": "empty", "input": "", "output": ""},
    {"instruction": "number", "input": "", "output": 3.5},
    {"instruction": "fine too", "input": "ctx", "output": "ok2"},
]


@pytest.mark.parametrize("bad_line,reason", [(2, "missing field 'output'"), (4, "must be text")])
def test_load_sft_bad_row_raises_with_file_and_line(tmp_path, bad_line, reason):
    rows = [BAD_FILE_ROWS[0], BAD_FILE_ROWS[bad_line - 1]]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=reason) as info:
        load_sft(path)
    assert f"{path}:2" in str(info.value) and "--skip-bad-rows" in str(info.value)


def test_load_sft_skip_bad_rows_counts_and_an_empty_reply_is_skipped_unless_strict(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_FILE_ROWS)
    with pytest.warns(SkippedRowsWarning, match=r"skipped 3 of 5 rows: 1 with an empty reply \(line 3\); "
                                                r"2 malformed \(lines 2, 4: bad row \(missing field"):
        convs, report = load_sft(path, skip_bad_rows=True)
    assert report.n_skipped == 3 and [c.messages[-1].content for c in convs] == ["ok", "ok2"]
    with pytest.raises(DataError, match="with an empty reply") as info:
        load_sft(write_jsonl(tmp_path / "e.jsonl", [BAD_FILE_ROWS[0], BAD_FILE_ROWS[2]]), strict=True)
    assert info.value.line == 2 and "--strict" in str(info.value)


UNREADABLE = (b'{"instruction": "a", "output": "1"}\n'
              b'{"instruction": oops}\n'                       # invalid JSON
              b'{"instruction": "\xff\xfe", "output": "x"}\n'  # invalid UTF-8
              b'[1, 2]\n'                                      # not an object
              b'"just text"\n'                                 # not an object
              b'{"instruction": "b", "output": "2"}\n')


def test_unreadable_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(UNREADABLE)
    with pytest.warns(SkippedRowsWarning, match=r"skipped 4 of 6 rows: 4 malformed \(lines 2, 3, 4, 5: invalid JSON"):
        convs, report = load_sft(path, skip_bad_rows=True)
    assert report.n_skipped == 4 and [c.messages[-1].content for c in convs] == ["1", "2"]
    with pytest.warns(SkippedRowsWarning):
        assert len(load_prompts(path, skip_bad_rows=True)[0]) == 2
    bad = []
    assert [n for n, _ in read_rows(path, on_bad=bad.append)] == [1, 6]
    assert [(e.line, e.what.split(" (")[0]) for e in bad] == [
        (2, "invalid JSON"), (3, "invalid UTF-8"), (4, "row is a JSON list, not an object"),
        (5, "row is a JSON str, not an object")]
    for line, what in [(2, "invalid JSON"), (3, "invalid UTF-8"), (4, "not an object")]:
        path.write_bytes(b"\n".join(UNREADABLE.split(b"\n")[i] for i in (0, line - 1)) + b"\n")
        with pytest.raises(DataError, match=what) as info:
            load_sft(path)
        assert f"{path}:2" in str(info.value) and "--skip-bad-rows" in str(info.value)


def test_unreadable_rows_of_a_json_array_are_skipped(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"instruction": "q", "output": "a"}, "text", 3]', encoding="utf-8")
    with pytest.warns(SkippedRowsWarning, match="lines 2, 3"):
        convs, report = load_sft(path, skip_bad_rows=True)
    assert (len(convs), report.n_skipped) == (1, 2)


def test_format_override_and_unknown_format(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "i", "context": "c", "response": "r"}])
    convs, _ = load_sft(path, format="instruction_response")
    assert convs[0].messages[0].content == "i\n\nc"
    with pytest.raises(UserError, match="unknown SFT format"):
        load_sft(path, format="nonsense")
    with pytest.raises(DataError, match="missing field 'output'"):
        load_sft(path, format="alpaca")


def test_a_conversation_trains_on_the_turns_it_has_and_strict_stops_at_any_change(tmp_path):
    def conv(*turns):
        return {"messages": [{"role": r, "content": c} for r, c in turns]}
    rows = [conv((U, "a"), (A, "b"), (U, "unanswered")),                 # trailing user turn
            conv((A, "mid-dialogue"), (U, "a"), (A, "b")),               # leading assistant turn
            conv((U, "a"), (A, "b"), (U, "c"), (A, "  ")),               # an empty reply at the end
            conv((A, "only a reply")),                                    # nothing to train on
            conv((U, "a"), (A, "b"))]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.warns(SkippedRowsWarning, match=r"skipped 1 of 5 rows: 1 with no assistant reply after a user turn "
                                                r"\(line 4\); kept with changes: 1 with turns after the last reply "
                                                r"dropped \(line 1\); 1 with leading assistant turns dropped \(line 2\); "
                                                r"1 cut before an empty reply \(line 3\)"):
        convs, report = load_sft(path)
    assert [[(m.role, m.content) for m in c.messages] for c in convs] == [[(U, "a"), (A, "b")]] * 4
    for line in (1, 2, 3, 4):
        with pytest.raises(DataError, match="--strict") as info:
            load_sft(write_jsonl(tmp_path / f"s{line}.jsonl", [rows[4], rows[line - 1]]), strict=True)
        assert info.value.line == 2
    kto = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "q", "completion": "", "label": False},
                                             {"prompt": "q", "completion": "ok", "label": True}])
    with pytest.warns(SkippedRowsWarning, match="1 with an empty completion"):
        assert len(load_unpaired(kto)[0]) == 1


# ---- preferences -------------------------------------------------------------------------------
HH_CHOSEN = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Capital of France?\n\nAssistant: Paris."
HH_REJECTED = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Capital of France?\n\nAssistant: Lyon, I think."
PREF_CASES = {
    "prompt_chosen_rejected": {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    "chosen_rejected_messages": {
        "prompt": "2+2?",
        "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]},
    "hh_rlhf": {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
    "sharegpt_preference": {"conversations": [{"from": "human", "value": "2+2?"}],
                            "chosen": {"from": "gpt", "value": "4"},
                            "rejected": {"from": "gpt", "value": "5"}},
}


@pytest.mark.parametrize("fmt", sorted(PREF_CASES))
def test_detect_and_convert_each_preference_format(fmt):
    row = PREF_CASES[fmt]
    assert detect_preference_format(row) == fmt
    pref = to_preference(row, fmt)
    assert isinstance(pref, Preference) and pref.prompt[-1].role == U
    if fmt == "hh_rlhf":
        assert [(m.role, m.content) for m in pref.prompt] == [(U, "Hi"), (A, "Hello."), (U, "Capital of France?")]
        assert (pref.chosen, pref.rejected) == ("Paris.", "Lyon, I think.")
    else:
        assert [(m.role, m.content) for m in pref.prompt] == [(U, "2+2?")]
        assert (pref.chosen, pref.rejected) == ("4", "5")


def test_preference_prompt_as_message_list_and_multi_turn_lists():
    row = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}],
           "chosen": "good", "rejected": "bad"}
    assert roles(to_preference(row, "prompt_chosen_rejected").prompt) == [S, U]
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "user", "content": "c"}]
    row = {"chosen": turns + [{"role": "assistant", "content": "good"}],
           "rejected": turns + [{"role": "assistant", "content": "bad"}]}
    pref = to_preference(row, "chosen_rejected_messages")
    assert [m.content for m in pref.prompt] == ["a", "b", "c"] and pref.chosen == "good"
    row["rejected"] = [{"role": "user", "content": "other"}, {"role": "assistant", "content": "bad"}]
    with pytest.raises(ValueError, match="differ"):
        to_preference(row, "chosen_rejected_messages")


def test_ultrafeedback_lists_with_replies_only_use_prompt_field(tmp_path):
    row = {"prompt": "q?", "chosen": [{"role": "assistant", "content": "yes"}],
           "rejected": [{"role": "assistant", "content": "no"}]}
    prefs, _ = load_preferences(write_jsonl(tmp_path / "uf.jsonl", [row]))
    assert prefs == [Preference([Message(U, "q?")], "yes", "no")]


def test_pairs_with_an_empty_or_identical_reply_are_skipped_and_counted_unless_strict(tmp_path):
    rows = [PREF_CASES["prompt_chosen_rejected"], {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "p", "chosen": "", "rejected": "x"}, {"prompt": "p", "chosen": "x", "rejected": " "},
            {"prompt": "p", "chosen": 3, "rejected": "x"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows[:4])
    with pytest.warns(SkippedRowsWarning, match=r"skipped 3 of 4 rows: 1 with identical chosen and rejected replies "
                                                r"\(line 2\); 1 with an empty chosen reply \(line 3\); 1 with an empty "
                                                r"rejected reply \(line 4\) \(--strict"):
        prefs, report = load_preferences(path)
    assert report.n_skipped == 3 and [p.rejected for p in prefs] == ["5"]
    with pytest.raises(DataError, match="with identical chosen and rejected replies") as info:
        load_preferences(path, strict=True)
    assert f"{path}:2" in str(info.value) and "--strict" in str(info.value)
    bad = write_jsonl(tmp_path / "b.jsonl", [rows[0], rows[4]])      # structural: stops unless --skip-bad-rows
    with pytest.raises(DataError, match="must be text") as info:
        load_preferences(bad)
    assert info.value.line == 2 and "--skip-bad-rows" in str(info.value)


# ---- unpaired (KTO) and prompts ----------------------------------------------------------------
def test_unpaired_formats(tmp_path):
    rows = [{"prompt": "q1", "completion": "good", "label": True},
            {"prompt": "q2", "completion": "bad", "label": False}]
    items, report = load_unpaired(write_jsonl(tmp_path / "k.jsonl", rows))
    assert report.n_skipped == 0 and items == [Unpaired([Message(U, "q1")], "good", True),
                                      Unpaired([Message(U, "q2")], "bad", False)]
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}], "label": False}
    items, _ = load_unpaired(write_jsonl(tmp_path / "m.jsonl", [row]))
    assert [m.content for m in items[0].prompt] == ["a", "b", "c"] and items[0].completion == "d"
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "completion": "x", "label": "maybe"}])
    with pytest.raises(DataError, match="label"):
        load_unpaired(bad)


def test_unpaired_from_paired_file(tmp_path):
    same = {"chosen": HH_CHOSEN, "rejected": HH_CHOSEN}
    path = write_jsonl(tmp_path / "p.jsonl", [PREF_CASES["hh_rlhf"], same])
    items, report = load_unpaired(path)
    assert report.n_skipped == 1
    assert [(u.completion, u.label) for u in items] == [("Paris.", True), ("Lyon, I think.", False)]


def test_load_prompts_from_every_kind(tmp_path):
    sft = write_jsonl(tmp_path / "s.jsonl", [SFT_CASES["lima"][0]])
    (prompt, answer), = load_prompts(sft)[0]
    assert roles(prompt) == [U, A, U, A, U] and prompt[-1].content == "And 3+3?" and answer is None
    qa = write_jsonl(tmp_path / "q.jsonl", [{"question": "2+2?", "answer": "#### 4"}, {"question": "1+1?", "answer": 2}])
    assert load_prompts(qa)[0] == [([Message(U, "2+2?")], "#### 4"), ([Message(U, "1+1?")], "2")]
    plain = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Write a poem."}])
    assert load_prompts(plain)[0] == [([Message(U, "Write a poem.")], None)]
    pref = write_jsonl(tmp_path / "h.jsonl", [PREF_CASES["hh_rlhf"]])
    assert load_prompts(pref)[0][0][0][-1].content == "Capital of France?"


# ---- real public samples (skipped where the shared folder is absent) ---------------------------
@pytest.mark.parametrize("rel,count", [("sft/alpaca_1k.json", 1000), ("sft/alpaca_gpt4_demo.json", 999),
                                       ("sft/lima.json", 1029), ("sft/identity_sharegpt.json", 500),
                                       ("sft/glaive_toolcall_demo.json", 300)])
def test_real_sft_files(rel, count):
    convs, report = load_sft(real(rel))
    assert (len(convs), report.n_skipped, report.changed) == (count, 0, {})
    for c in convs:
        assert c.messages[-1].role == A and c.messages[-1].content.strip()
        assert all(m.role != A for m in c.messages[:1])


def test_real_lima_history_and_glaive_tools():
    lima, _ = load_sft(real("sft/lima.json"))
    assert sum(len(c.messages) > 2 for c in lima) == 29  # rows with a non-empty history
    glaive, _ = load_sft(real("sft/glaive_toolcall_demo.json"))
    assert all(c.messages[0].role == S and c.messages[0].content.startswith("Tools:") for c in glaive)


def test_real_sharegpt_trains_on_the_turns_it_has_by_default():
    """338 of its 1000 conversations start with a gpt turn; 9 hold nothing else. By default those
    turns are dropped and the 9 rows skipped, both reported with line numbers; --strict stops."""
    path = real("sft/sharegpt_1k.jsonl")
    with pytest.warns(SkippedRowsWarning, match=r"skipped 9 of 1000 rows: 9 with no assistant reply after a user "
                                                r"turn \(lines 46, 443, 462, 622, 731, \.\.\.\); kept with changes: 329 "
                                                r"with leading assistant turns dropped \(lines 1, 2, 4, 8, 9, \.\.\.\)"):
        convs, report = load_sft(path)
    assert (len(convs), report.n_skipped, len(report.changed["with leading assistant turns dropped"])) == (991, 9, 329)
    assert all(c.messages[0].role in (U, S) and c.messages[-1].role == A for c in convs)
    with pytest.raises(DataError, match="with leading assistant turns dropped") as info:
        load_sft(path, strict=True)
    assert info.value.line == 1 and "--strict" in str(info.value)


def test_real_hh_rlhf_prompt_split():
    path = real("preference/hh-rlhf/helpful-base.jsonl.gz")
    with pytest.warns(SkippedRowsWarning, match=r"skipped 6 of 2354 rows: 4 with an empty rejected reply \(lines 121, "
                                                r"741, 1215, 2064\); 2 with identical chosen and rejected replies "
                                                r"\(lines 722, 2169\)"):
        prefs, report = load_preferences(path)
    assert (len(prefs), report.n_skipped) == (2348, 6)
    checked = 0
    for _, row in read_rows(path):
        c, r = row["chosen"], row["rejected"]
        if c == r or c.count("\n\nAssistant:") != r.count("\n\nAssistant:") or not r.rsplit("Assistant:", 1)[1].strip():
            continue  # the plain rule below needs one reply per side
        pref = to_preference(row, "hh_rlhf")
        assert pref.chosen == c.rsplit("\n\nAssistant:", 1)[1].strip()
        assert pref.rejected == r.rsplit("\n\nAssistant:", 1)[1].strip()
        assert pref.prompt[-1].role == U
        assert pref.prompt[-1].content == c.rsplit("\n\nAssistant:", 1)[0].rsplit("\n\nHuman:", 1)[1].strip()
        assert sum(m.role == U for m in pref.prompt) == c.count("\n\nHuman:")
        assert all(m.role in (U, A) for m in pref.prompt)
        checked += 1
    assert checked > 2300


def test_real_preference_files():
    prefs, report = load_preferences(real("preference/dpo_sharegpt_demo.json"))
    assert (len(prefs), report.n_skipped) == (300, 0)
    assert sum(p.prompt[0].role == S for p in prefs) == 80
    path = real("preference/ultrafeedback_1k.jsonl")
    with pytest.warns(SkippedRowsWarning, match=r"skipped 6 of 1000 rows: 4 with identical chosen and rejected replies "
                                                r"\(lines 307, 656, 911, 998\); 1 with an empty rejected reply \(line 479\); "
                                                r"1 with an empty chosen reply \(line 834\)"):
        prefs, report = load_preferences(path)
    assert (len(prefs), report.n_skipped) == (994, 6)
    with pytest.raises(DataError, match="with identical chosen and rejected replies") as info:
        load_preferences(path, strict=True)
    assert info.value.line == 307
    for name, n in (("helpful-online", 1132), ("helpful-rejection-sampled", 2717)):
        with pytest.warns(SkippedRowsWarning):
            assert len(load_preferences(real(f"preference/hh-rlhf/{name}.jsonl.gz"))[0]) == n


def test_real_kto_file():
    items, report = load_unpaired(real("preference/kto_demo.json"))
    assert report.n_skipped == 0 and len(items) == 300
    assert Counter(u.label for u in items) == {True: 150, False: 150}
    assert all(u.prompt[-1].role == U for u in items)


def test_real_prompt_sources():
    gsm = real("eval/gsm8k_train.jsonl")
    prompts, _ = load_prompts(gsm)
    assert len(prompts) == 7473 and prompts[0][1].split("####")[-1].strip() == "72"
    assert len(load_prompts(real("sft/identity_sharegpt.json"))[0]) == 500
    with pytest.warns(SkippedRowsWarning, match="9 with no user turn to prompt with"):
        prompts, report = load_prompts(real("sft/sharegpt_1k.jsonl"))   # a conversation's prompt: up to its last user turn
    assert len(prompts) == 991 and all(p[-1].role == U for p, _ in prompts)
    with pytest.raises(DataError, match="--strict"):
        load_prompts(real("sft/sharegpt_1k.jsonl"), strict=True)
