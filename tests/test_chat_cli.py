"""`tinygpt chat`: stdin piped into the command on tiny models (float and int8)."""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinygpt.chat import builtin_template, encode_segments
from tinygpt.commands.generation import ChatSession, chat_loop
from tinygpt.checkpoint import save_model
from tinygpt.cli import main
from tinygpt.config import ModelConfig, pad_vocab
from tinygpt.data.formats import Message
from tinygpt.errors import UserError
from tinygpt.generate import generate
from tinygpt.model import GPT
from tinygpt.tokenizer import IM_END, Tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.byte_level()


def says_hi(tok) -> GPT:
    """A nano GPT that answers every chatml prompt with 'hi' then <|im_end|>. The blocks' output
    projections are zero (the default init), so the last hidden state is the normalised embedding
    of the last token: a bigram chain '\\n' -> 'h' -> 'i' -> <|im_end|>, exact under int8 too."""
    torch.manual_seed(0)
    m = GPT(ModelConfig.from_name("nano", vocab_size=pad_vocab(tok.vocab_size)))
    nl, h, i, end = tok.encode("\n")[0], tok.encode("h")[0], tok.encode("i")[0], tok.token_to_id(IM_END)
    with torch.no_grad():
        emb, head = m.model.embed_tokens.weight, m.lm_head.weight
        emb.zero_()
        emb[:, 0] = 1.0
        for k, t in enumerate((nl, h, i), start=1):
            emb[t].zero_()
            emb[t, k] = 1.0
        head.zero_()
        for k, t in enumerate((h, i, end), start=1):
            head[t, k] = 10.0
    return m


def random_nano(tok) -> GPT:
    torch.manual_seed(0)
    m = GPT(ModelConfig.from_name("nano", vocab_size=pad_vocab(tok.vocab_size)))
    with torch.no_grad():   # the default init zeros the output projections; make every path matter
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def run_chat(monkeypatch, capsys, argv, lines: str):
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    rc = main(["chat", *argv, "--device", "cpu"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_chat_stops_at_end_of_turn_and_handles_commands(tmp_path, tok, monkeypatch, capsys):
    save_model(tmp_path / "m.tinygpt", says_hi(tok), tok)
    rc, out, err = run_chat(monkeypatch, capsys, [str(tmp_path / "m.tinygpt")],
                            "hello\n\n/reset\nhow are you?\n/exit\nnever read\n")
    assert (rc, out) == (0, "hi\nhi\n")
    rc, out, _ = run_chat(monkeypatch, capsys, [str(tmp_path / "m.tinygpt"), "--temperature", "0"], "a\nb\nc")
    assert (rc, out) == (0, "hi\nhi\nhi\n")      # EOF without a newline still answers the last line


def test_chat_history_and_reset_match_greedy_decoding_of_the_conversation(tmp_path, tok, monkeypatch, capsys):
    model = random_nano(tok)
    save_model(tmp_path / "r.tinygpt", model, tok)
    template = builtin_template("chatml")
    stops = {tok.token_to_id(IM_END), *tok.stop_ids()}

    def greedy(msgs):
        ids, _ = encode_segments(tok, template.render(msgs, add_generation_prompt=True))
        g = generate(model, [ids], 6, temperature=0.0, stop_ids=stops, vocab_limit=tok.vocab_size)
        return tok.decode([t for t in g.tokens[0] if t not in stops], skip_special=True)

    system = Message("system", "Be brief.")
    r1 = greedy([system, Message("user", "hello")])
    r2 = greedy([system, Message("user", "hello"), Message("assistant", r1), Message("user", "and you?")])
    r3 = greedy([system, Message("user", "and you?")])
    assert r2 != r3          # the history changes the reply, so the comparison below means something
    rc, out, _ = run_chat(monkeypatch, capsys, [str(tmp_path / "r.tinygpt"), "--temperature", "0", "--system",
                                                "Be brief.", "--max-new-tokens", "6", "--template", "chatml"],
                          "hello\nand you?\n/reset\nand you?\n")
    assert rc == 0 and out == f"{r1}\n{r2}\n{r3}\n"


def test_session_drops_oldest_exchanges_and_refuses_a_message_too_long(tok):
    model = says_hi(tok)
    s = ChatSession(model, tok, builtin_template("chatml"), system="S", max_new_tokens=40)
    old = [Message(r, f"{r[0]}{k}" * 3) for k in range(4) for r in ("user", "assistant")]
    s.history = list(old)
    ids, budget = s.prompt_ids("q")
    assert budget == 40 and len(ids) + 40 <= model.config.block_size
    assert 0 < len(s.history) < len(old) and s.history == old[len(old) - len(s.history):]
    assert s.history[0].role == "user" and s.messages("q")[0] == Message("system", "S")
    s.history = list(old)
    with pytest.raises(UserError, match="fills the model's context"):
        s.prompt_ids("x" * 200)
    out, err = io.StringIO(), io.StringIO()   # in the loop: a notice, and the session goes on
    assert chat_loop(s, io.StringIO("x" * 200 + "\nhello\n"), out, err) == 1
    assert out.getvalue() == "hi\n" and "fills the model's context" in err.getvalue()
    assert s.history[-2:] == [Message("user", "hello"), Message("assistant", "hi")]


def test_chat_on_an_int8_file_through_a_pipe(tmp_path, tok):
    save_model(tmp_path / "m.tinygpt", says_hi(tok), tok)
    assert main(["quantize", str(tmp_path / "m.tinygpt"), "--int8", "--out", str(tmp_path / "q.tinygpt"),
                 "--device", "cpu"]) == 0
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "tinygpt.cli", "chat", str(tmp_path / "q.tinygpt"), "--device", "cpu"],
                       input="hello\nworld\n", capture_output=True, text=True, env=env, timeout=120)
    assert (p.returncode, p.stdout) == (0, "hi\nhi\n"), p.stderr


@pytest.mark.parametrize("argv,msg", [
    (["{m}", "--max-new-tokens", "128"], "--max-new-tokens must be in [1, 127]"),
    (["{m}", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["{dir}/missing.tinygpt"], "missing.tinygpt"),
])
def test_chat_user_errors(tmp_path, tok, monkeypatch, capsys, argv, msg):
    save_model(tmp_path / "m.tinygpt", says_hi(tok), tok)
    argv = [a.replace("{m}", str(tmp_path / "m.tinygpt")).replace("{dir}", str(tmp_path)) for a in argv]
    rc, out, err = run_chat(monkeypatch, capsys, argv, "hello\n")
    assert rc == 2 and out == "" and err.startswith("tinygpt: error: ") and msg in err
    assert err.count("\n") == 1 and "Traceback" not in err
