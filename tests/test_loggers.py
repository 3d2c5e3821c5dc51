"""--log tensorboard / wandb receive exactly what metrics.jsonl gets."""
import importlib.util
import json

import pytest

from tinygpt.cli import main


def _train(tmp_path, *log):
    (tmp_path / "c.txt").write_text("\n\n".join(f"doc {i}: the cat sat on the mat {i}." for i in range(30)))
    out = tmp_path / "m.tinygpt"
    argv = ["train", "--corpus", str(tmp_path / "c.txt"), "--byte-tokenizer", "--preset", "nano", "--ctx", "32",
            "--steps", "4", "--batch", "2", "--device", "cpu", "--quiet", "--out", str(out)]
    for name in log:
        argv += ["--log", name]
    assert main(argv) == 0
    run = tmp_path / "m.run"
    return run, [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_gets_every_metrics_row(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run, rows = _train(tmp_path, "tensorboard")
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    for key in ("loss", "lr", "grad_norm"):
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert got == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows], key


def test_wandb_offline_gets_the_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run, rows = _train(tmp_path, "wandb")
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, "offline mode with no API key"
    run_id = (run / "wandb-id").read_text().strip()
    assert offline[0].name.endswith(run_id)
    history = [r for r in _wandb_history(next(offline[0].glob("run-*.wandb"))) if "loss" in r]
    assert [(r["_step"], r["loss"]) for r in history] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]


def _wandb_history(path):
    """History rows of an offline .wandb file: a LevelDB-style log (7-byte file header, 32 KiB
    blocks, records of crc32 + length + type, split across blocks) of protobuf Records. wandb's
    own Python reader is gone from its recent releases."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, buf, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:                    # a block tail too short for a header: padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4) and buf:                     # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_a_missing_logging_package_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    (tmp_path / "c.txt").write_text("some text\n")
    assert main(["train", "--corpus", str(tmp_path / "c.txt"), "--byte-tokenizer", "--log", "wandb",
                 "--out", str(tmp_path / "m.tinygpt")]) == 2
    err = capsys.readouterr().err
    assert "--log wandb needs the wandb package" in err and "Traceback" not in err
    assert not (tmp_path / "m.run").exists()
