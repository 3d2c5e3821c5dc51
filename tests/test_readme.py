"""The README's recipe, run as written: every line of its "one command at a time" block, in
order, in one folder, each output feeding the next.

The default test shortens every training line to a few steps (the chain of files and formats is
what it checks, in seconds); the slow test runs the lines exactly as written and checks what the
README promises of them: SFT with its template clearly above the base on the synthetic eval, GRPO
rewards above 0, and the export to transformers and GGUF loading back."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from tinygpt.cli import main
from tinygpt.commands import command
from tinygpt.options import specs

README = Path(__file__).resolve().parents[1] / "README.md"
NOT_RUN = {"chat", "serve"}          # interactive / a server: parsed here, run in their own tests


def readme_commands() -> list[list[str]]:
    """argv (without `tinygpt`) of each line of the recipe block, comments dropped."""
    text = README.read_text()
    block = re.search(r"## The recipe, one command at a time\n+```bash\n(.*?)```", text, re.S).group(1)
    return [shlex.split(line, comments=True)[1:] for line in block.splitlines() if line.strip()]


def _name(argv: list[str]) -> str:
    return " ".join(argv[:2]) if argv[0] in ("data", "tokenizer") else argv[0]


def _quick(argv: list[str]) -> list[str]:
    """The same line with a few steps, few tokens, on the CPU, quiet."""
    names = {s.name for s in specs(command(_name(argv)).options)}
    argv = list(argv)
    if "--steps" in argv:
        argv[argv.index("--steps") + 1] = "3"
    elif "steps" in names:
        argv += ["--steps", "3"]
    extra = {"quiet": ["--quiet"], "device": ["--device", "cpu"], "max_new_tokens": ["--max-new-tokens", "8"],
             "limit": ["--limit", "8"]}
    for name, flags in extra.items():
        if name in names and flags[0] not in argv:
            argv += flags
    return argv


def _run(argv: list[str]) -> None:
    if _name(argv) in NOT_RUN:
        command(_name(argv)).parse(argv[1:])            # the line's options are valid
        return
    assert main(argv) == 0, shlex.join(argv)


def test_the_readme_recipe_block_is_the_whole_recipe():
    names = [_name(a) for a in readme_commands()]
    for want in ("data synth", "tokenizer train", "train", "sft", "reward", "dpo", "grpo", "eval", "export"):
        assert want in names, want


def test_every_readme_recipe_line_runs_and_feeds_the_next(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir(exist_ok=True)
    for argv in readme_commands():
        if _name(argv) == "generate":       # 800 questions x 4 samples: a few of them here
            rows = (tmp_path / "data" / "questions.jsonl").read_text().splitlines()[:4]
            (tmp_path / "few.jsonl").write_text("\n".join(rows) + "\n")
            argv = [("few.jsonl" if a == "data/questions.jsonl" else a) for a in argv]
        _run(_quick(argv))
    assert (tmp_path / "sft-hf" / "config.json").exists()


@pytest.mark.slow
def test_the_readme_recipe_as_written_gives_what_it_promises(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in readme_commands():
        argv = argv + (["--device", "cpu"] if "device" in {s.name for s in specs(command(_name(argv)).options)}
                       else [])
        if _name(argv) == "eval":           # the base and SFT alone beside the line's SFT + DPO
            for lora, out in (([], "base.json"), (["--lora", "sft.lora"], "sft.json")):
                _run(["eval", "base.tinygpt", *lora, "--tasks", "synth", "--data", "data/eval.jsonl", "--out", out,
                      "--device", "cpu"])
        _run(argv)
    score = lambda f: json.loads((tmp_path / f).read_text())["tasks"]["synth"]["accuracy"]   # noqa: E731
    assert score("sft.json") >= score("base.json") + 0.2, (score("base.json"), score("sft.json"))
    rewards = [json.loads(x)["reward_mean"] for x in (tmp_path / "grpo.run" / "metrics.jsonl").read_text().splitlines()]
    assert max(rewards) > 0
    assert main(["export", "sft.tinygpt", "--format", "gguf", "--out", "sft.gguf"]) == 0
    assert main(["import", "sft-hf", "--out", "back.tinygpt"]) == 0
