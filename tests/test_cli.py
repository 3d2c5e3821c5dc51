"""Command line: the happy path (train -> sample) and one-line errors with exit code 2."""
import pytest

from tinygpt.cli import main

TEXT = "\n\n".join(f"Doc {i}: a small story about the number {i}." for i in range(40))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinygpt: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text(TEXT)
    return p


def train_args(corpus, out, *extra):
    return ["train", "--corpus", corpus, "--preset", "nano", "--byte-tokenizer", "--ctx", "32", "--steps", "3",
            "--batch", "2", "--device", "cpu", "--dtype", "float32", "--quiet", "--out", out, *extra]


def test_train_then_sample(tmp_path, corpus, capsys):
    out = tmp_path / "m.tinygpt"
    code, stdout, _ = run(capsys, *train_args(corpus, out))
    assert code == 0 and out.exists() and "loss" in stdout
    code, stdout, _ = run(capsys, "sample", out, "--prompt", "Doc", "--max-new-tokens", "5", "--seed", "1",
                          "--num-samples", "2", "--device", "cpu")
    assert code == 0 and stdout.startswith("Doc") and stdout.count("Doc") >= 2


def test_config_file_supplies_options_and_flags_win(tmp_path, corpus, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"corpus: [{corpus}]\npreset: nano\nbyte-tokenizer: true\nctx: 32\nsteps: 2\nbatch: 2\n"
                   f"device: cpu\nquiet: true\nout: {tmp_path / 'from_file.tinygpt'}\n")
    code, _, _ = run(capsys, "train", "--config", cfg, "--out", tmp_path / "flag.tinygpt")
    assert code == 0 and (tmp_path / "flag.tinygpt").exists() and not (tmp_path / "from_file.tinygpt").exists()
    cfg.write_text("no_such_option: 1\n")
    code, _, err = run(capsys, "train", "--config", cfg)
    assert_user_error(code, err, "no_such_option", str(cfg))


@pytest.mark.parametrize("content,needle", [
    (None, "not found"),
    ("\n\n  \n", "empty corpus"),
    (b"\x7fELF\x00\x00\x01binary", "binary"),
    ("tiny", "shorter than one context"),
    (b"line one\nline two\nbad \xff\xfe byte\n", "invalid UTF-8"),
])
def test_bad_corpus(tmp_path, capsys, content, needle):
    path = tmp_path / "bad.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    out = tmp_path / "m.tinygpt"
    code, _, err = run(capsys, *train_args(path, out))
    assert_user_error(code, err, needle, "bad.txt")
    if needle == "invalid UTF-8":
        assert "bad.txt:3" in err
    assert not out.exists()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("flags,needle", [
    (["--preset", "gigantic"], "unknown preset 'gigantic'"),
    (["--dtype", "float8"], "float8"),
    (["--lr-schedule", "zigzag"], "zigzag"),
    (["--steps", "0"], "--steps"),
    (["--steps", "ten"], "ten"),
])
def test_bad_flag_values(tmp_path, corpus, capsys, flags, needle):
    out = tmp_path / "m.tinygpt"
    code, _, err = run(capsys, *train_args(corpus, out), *flags)
    assert_user_error(code, err, needle)
    assert not out.exists()


def test_resume_with_mismatched_config(tmp_path, corpus, capsys):
    out = tmp_path / "m.tinygpt"
    assert run(capsys, *train_args(corpus, out))[0] == 0
    before = out.read_bytes()
    code, _, err = run(capsys, *train_args(corpus, out), "--resume", "--batch", "4")
    assert_user_error(code, err, "--resume", "batch")
    assert out.read_bytes() == before
    code, _, err = run(capsys, *train_args(corpus, tmp_path / "other.tinygpt"), "--resume")
    assert_user_error(code, err, "no training state")


def test_sample_missing_model(tmp_path, capsys):
    code, _, err = run(capsys, "sample", tmp_path / "nope.tinygpt")
    assert_user_error(code, err, "nope.tinygpt")
