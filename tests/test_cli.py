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
    (["--preset", "gigantic"], "--preset must be one of nano"),
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


# ---- --skip-bad-rows --------------------------------------------------------------------------------
@pytest.fixture
def base(tmp_path):
    import torch
    from tinygpt.checkpoint import save_model
    from tinygpt.config import ModelConfig, pad_vocab
    from tinygpt.model import GPT
    from tinygpt.tokenizer import Tokenizer
    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    save_model(tmp_path / "base.tinygpt", GPT(ModelConfig.from_name("nano", vocab_size=pad_vocab(tok.vocab_size))), tok)
    return tmp_path / "base.tinygpt"


def sft_args(base, data, out, *extra):
    return ["sft", base, "--data", data, "--out", out, "--steps", "1", "--batch", "2", "--ctx", "64",
            "--device", "cpu", "--dtype", "float32", "--quiet", *extra]


GOOD = b'{"instruction": "Say hi.", "output": "hi"}\n'


@pytest.mark.parametrize("bad,what", [(b'{"instruction": oops}\n', "invalid JSON"),
                                      (b'{"instruction": "\xff\xfe", "output": "x"}\n', "invalid UTF-8"),
                                      (b'["a", "list"]\n', "not an object")])
def test_unreadable_rows_stop_with_file_and_line(tmp_path, base, capsys, bad, what):
    data = tmp_path / "d.jsonl"
    data.write_bytes(GOOD * 3 + bad + GOOD)
    out = tmp_path / "a.lora"
    code, _, err = run(capsys, *sft_args(base, data, out))
    assert_user_error(code, err, what, f"{data}:4", "--skip-bad-rows")
    assert not out.exists()


def test_skip_bad_rows_skips_unreadable_rows_and_reports_the_count_when_quiet(tmp_path, base, capsys):
    data = tmp_path / "d.jsonl"
    data.write_bytes(GOOD * 3 + b'{"instruction": oops}\n' + b'{"instruction": "\xff"}\n' + b'[1]\n' + b'"text"\n'
                     + b'{"instruction": "no output"}\n' + GOOD)
    out = tmp_path / "a.lora"
    code, _, err = run(capsys, *sft_args(base, data, out, "--skip-bad-rows"))
    assert code == 0 and out.exists()
    assert err.strip() == f"tinygpt: warning: {data}: skipped 5 of 9 rows: 5 malformed (lines 4, 5, 6, 7, 8: " \
                          "invalid JSON (Expecting value at column 17))"


# ---- --config FILE.yaml -----------------------------------------------------------------------------
def write_config(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,needles", [
    ("preset: [a]\n", ["--preset takes one value", "c.yaml"]),
    ("steps: 2.5\n", ["--steps must be an integer, got 2.5", "c.yaml"]),
    ("lr_schedule: zigzag\n", ["--lr-schedule must be one of", "'zigzag'", "c.yaml"]),
    ("dtype: float8\n", ["float8", "c.yaml"]),
    ("byte-tokenizer: 1\n", ["--byte-tokenizer is a switch", "c.yaml"]),
    ("lr: {a: 1}\n", ["--lr takes a number", "c.yaml"]),
    ("config: other.yaml\n", ["unknown option 'config'", "c.yaml"]),
    ("- a\n- b\n", ["mapping", "c.yaml"]),
    ("steps: [\n", ["invalid YAML", "c.yaml"]),
])
def test_config_file_values_are_checked_like_flags(tmp_path, corpus, capsys, text, needles):
    cfg = write_config(tmp_path, text)
    out = tmp_path / "m.tinygpt"
    code, _, err = run(capsys, *train_args(corpus, out), "--config", cfg)
    assert_user_error(code, err, *needles)
    assert not out.exists() and not (tmp_path / "m.run").exists()


def test_config_file_values_are_converted_and_flags_win(tmp_path):
    from tinygpt.cli import parse_args
    cfg = write_config(tmp_path, "model: base.tinygpt\ndata: d.jsonl\nout: x.lora\nlora: [a.lora, b.lora]\n"
                                 "lora-weight: [0.5]\nlr: 3e-4\nsteps: 7\nno_packing: true\nfull: false\n"
                                 "lr_schedule: wsd\nwarmup: 3\ntemplate: null\n")
    _, a = parse_args(["sft", "--config", str(cfg)])
    assert (a.model, a.data, a.out, a.lora, a.lora_weight) == ("base.tinygpt", "d.jsonl", "x.lora",
                                                               ["a.lora", "b.lora"], [0.5])
    assert (a.lr, a.steps, a.packing, a.full, a.lr_schedule, a.warmup) == (3e-4, 7, False, False, "wsd", 3)
    _, a = parse_args(["sft", "other.tinygpt", "--config", str(cfg), "--lora", "c.lora", "--steps", "9",
                       "--lr-schedule", "linear"])
    assert (a.model, a.lora, a.lora_weight, a.steps, a.lr_schedule) == ("other.tinygpt", ["c.lora"], [0.5], 9,
                                                                        "linear")
    corpus_cfg = write_config(tmp_path, "corpus: [a.txt, b.txt]\nout: m.tinygpt\n")
    _, a = parse_args(["train", "--config", str(corpus_cfg), "--steps", "4"])
    assert (a.corpus, a.out, a.steps) == (["a.txt", "b.txt"], "m.tinygpt", 4)
    _, a = parse_args(["ppo", "p.tinygpt", "--prompts", "q.jsonl", "--reward-fn", "synth", "--config",
                       str(write_config(tmp_path, "iterations: 3\nout: p.lora\n"))])
    assert a.steps == 3


# ---- values checked before anything is written ------------------------------------------------------
@pytest.mark.parametrize("flags,needle", [(["--top-k", "-3"], "--top-k"), (["--temperature", "-1"], "--temperature"),
                                          (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p")])
def test_sample_checks_sampling_values_first(tmp_path, capsys, flags, needle):
    code, _, err = run(capsys, "sample", tmp_path / "missing.tinygpt", "--device", "cpu", *flags)
    assert_user_error(code, err, needle)


def test_out_that_is_a_folder_is_refused_before_training(tmp_path, corpus, capsys):
    out = tmp_path / "folder"
    out.mkdir()
    code, _, err = run(capsys, *train_args(corpus, out))
    assert_user_error(code, err, "--out is a folder", str(out))
    assert list(out.iterdir()) == [] and not (tmp_path / "folder.run").exists()


# ---- train: validation at the end, warmup default, --init from a Hugging Face folder -----------------
def _metrics(out):
    import json
    return [json.loads(x) for x in (out.parent / (out.stem + ".run") / "metrics.jsonl").read_text().splitlines()]


def test_val_split_alone_validates_at_the_end_and_short_runs_decay(tmp_path, corpus, capsys):
    out = tmp_path / "m.tinygpt"
    code, stdout, err = run(capsys, *train_args(corpus, out, "--steps", "20", "--val-split", "0.2", "--lr", "1e-3"))
    assert code == 0 and "val loss" in stdout, err
    m = _metrics(out)
    assert len(m) == 20 and "val_loss" in m[-1] and not any("val_loss" in r for r in m[:-1])
    lrs = [r["lr"] for r in m]
    assert lrs[0] == pytest.approx(1e-3 / 2) and lrs[1] == pytest.approx(1e-3)  # warmup 2 = 10% of 20
    assert lrs[-1] < 0.15e-3                                                     # cosine to lr/10


def test_init_from_a_hugging_face_folder(tmp_path, corpus, capsys):
    import json
    import torch
    transformers = pytest.importorskip("transformers")
    transformers.logging.disable_progress_bar()
    from tinygpt import load_model_and_tokenizer
    from tinygpt.checkpoint import load_model
    from tinygpt.tokenizer import Tokenizer
    tok = Tokenizer.byte_level()
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    hf = tmp_path / "hf"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(hf)
    tok.save(hf / "tokenizer.json")
    (hf / "tokenizer_config.json").write_text(json.dumps({"bos_token": tok.bos, "eos_token": tok.eos}))
    out = tmp_path / "m.tinygpt"
    argv = train_args(corpus, out, "--init", hf, "--lr", "1e-12", "--steps", "1")
    code, _, err = run(capsys, *[x for x in argv if x != "--byte-tokenizer"])
    assert code == 0, err
    trained, _, _ = load_model(out)
    imported, _ = load_model_and_tokenizer(hf)
    assert (trained.config.n_embd, trained.config.n_layer, trained.config.n_kv_head) == (64, 2, 2)
    a, b = trained.state_dict(), imported.state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# ---- sft --no-packing ---------------------------------------------------------------------------------
def test_no_packing_flag_trains_on_padded_rows(tmp_path, base):
    import json
    import torch
    from tinygpt import load_model_and_tokenizer
    from tinygpt.io import load_tensors
    from tinygpt.stages.sft import SFTOptions, SFTTrainer
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Add {i} and {i}.", "output": str(2 * i)}) + "\n"
                            for i in range(12)))
    flags = ["--steps", "2", "--lr", "1e-2", "--batch", "4"]
    unpacked, packed = tmp_path / "u.lora", tmp_path / "p.lora"
    assert main([str(x) for x in sft_args(base, data, unpacked, *flags, "--no-packing")]) == 0
    assert main([str(x) for x in sft_args(base, data, packed, *flags)]) == 0
    model, tok = load_model_and_tokenizer(base)
    ref = tmp_path / "ref.lora"
    SFTTrainer(SFTOptions(data=str(data), out=str(ref), ctx=64, packing=False, device="cpu", steps=2, lr=1e-2,
                          batch=4, dtype="float32", quiet=True), model, tok, log=lambda *m: None).train()
    u, p, r = load_tensors(unpacked)[0], load_tensors(packed)[0], load_tensors(ref)[0]
    assert all(torch.equal(u[k], r[k]) for k in r)
    assert not all(torch.equal(p[k], r[k]) for k in r)


def test_serve_refuses_http_workers_without_the_engine_process(tmp_path, corpus, capsys):
    out = tmp_path / "m.tinygpt"
    assert run(capsys, *train_args(corpus, out))[0] == 0
    code, _, err = run(capsys, "serve", out, "--device", "cpu", "--no-engine-process", "--http-workers", "2",
                       "--port", "1")
    assert_user_error(code, err, "--http-workers")
