"""The command registry: every `tinygpt` command, where it lives and its one-line help.

A command's target is either a training `Stage` class (its `Options` are the flags; running it
is `Stage(options).train()` and printing its summary line) or a function whose one parameter is
annotated with its Options class (`def sample(opts: SampleOptions)`). Nothing is imported until a
command is used, so `tinygpt --help` and a mistyped flag answer at once. The command line
(`cli.py`) and the pipeline (`pipeline.py`) both go through this table: one parser per command,
the same for every caller.
"""
from __future__ import annotations

import importlib
import inspect
import typing
from dataclasses import dataclass

from ..errors import UserError
from ..options import _help, grouped, parse, values_from_mapping

COMMANDS: dict[str, tuple[str, str]] = {
    "data synth": ("tinygpt.commands.data:synth", "write the synthetic world (corpus, SFT, preferences, eval)"),
    "tokenizer train": ("tinygpt.commands.data:train_tokenizer", "train a byte-level BPE tokenizer on a corpus"),
    "train": ("tinygpt.stages.pretrain:PretrainStage", "pretrain a GPT from scratch on a corpus"),
    "sft": ("tinygpt.stages.sft:SFTTrainer", "supervised fine-tuning on chat data (LoRA by default)"),
    "reward": ("tinygpt.stages.reward:RewardModelTrainer", "train a reward model (Bradley-Terry) on preference pairs"),
    "dpo": ("tinygpt.stages.preference:DPOTrainer", "direct preference optimisation (DPO, IPO, hinge, robust, SimPO)"),
    "orpo": ("tinygpt.stages.preference:ORPOTrainer", "ORPO: SFT + odds-ratio preference in one stage"),
    "kto": ("tinygpt.stages.preference:KTOTrainer", "KTO on unpaired desirable/undesirable completions"),
    "ppo": ("tinygpt.stages.rl:PPOTrainer", "RLHF with PPO: value head, reward model, KL to the SFT policy"),
    "grpo": ("tinygpt.stages.rl:GRPOTrainer", "GRPO / RLOO / Dr. GRPO / DAPO / GSPO with verifiable rewards, "
             "no value network"),
    "distill": ("tinygpt.stages.distill:DistillTrainer", "distil a teacher into a student: forward/reverse KL or "
                "JSD on its logits, on- or off-policy"),
    "sample": ("tinygpt.commands.generation:sample", "generate text from a model"),
    "chat": ("tinygpt.commands.generation:chat", "talk with a model: one user message per line, /reset, /exit"),
    "generate": ("tinygpt.commands.generate_data:generate_command", "write a data set with a model: samples, "
                 "best-of-n, rejection sampling or preference pairs"),
    "serve": ("tinygpt.serve.command:serve_command", "serve a model and its adapters over an OpenAI-compatible API "
              "and a chat page"),
    "eval": ("tinygpt.commands.evaluate:eval_command", "evaluate a model on benchmark tasks"),
    "score": ("tinygpt.commands.evaluate:score_command", "print the reward a reward model gives a text"),
    "merge": ("tinygpt.commands.files:merge_command", "fold LoRA adapters into a model and write a .tinygpt"),
    "import": ("tinygpt.commands.files:import_command", "convert a Hugging Face folder or a .gguf into a .tinygpt"),
    "export": ("tinygpt.commands.files:export_command", "export to a transformers folder, a PEFT adapter or GGUF"),
    "quantize": ("tinygpt.commands.files:quantize_command", "weight-only int8 quantization (per-channel scales)"),
    "verify": ("tinygpt.commands.files:verify_command", "check a .tinygpt, .lora or training state file (checksum, "
               "metadata, shapes, finite values) without loading a model"),
    "pipeline": ("tinygpt.pipeline:pipeline_command", "run the whole recipe from a YAML file (resumable)"),
    "report": ("tinygpt.report:report_command", "(re)build report.md and report.html of a run folder"),
}


@dataclass
class Command:
    name: str
    options: type            # the Options dataclass
    run: typing.Callable     # options -> None (prints its result)
    help: str
    stage: type | None = None

    def parse(self, argv: list[str]):
        return parse(self.options, argv, f"tinygpt {self.name}", self.help)

    def from_mapping(self, mapping: dict, where: str):
        """Options from a mapping keyed like --config files (pipeline stages)."""
        opts = self.options(**values_from_mapping(self.options, mapping, where))
        opts.require()
        return opts


def _stage_runner(cls):
    def run(opts) -> dict:
        stage = cls(opts)
        last = stage.train()
        if stage.engine is None or stage.engine.is_main:     # one line under torchrun
            print(stage.summary(last))
        return last
    return run


def command(name: str) -> Command:
    """The command called `name` (a user error naming the known ones otherwise)."""
    if name not in COMMANDS:
        raise UserError(f"unknown command '{name}'", None, f"choose one of: {', '.join(COMMANDS)}")
    target, help_text = COMMANDS[name]
    module, _, attr = target.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    if inspect.isclass(obj):
        return Command(name, obj.Options, _stage_runner(obj), help_text, obj)
    param = next(iter(inspect.signature(obj).parameters))
    return Command(name, typing.get_type_hints(obj)[param], obj, help_text)


def split_command(argv: list[str]) -> tuple[str | None, list[str]]:
    """(command name, the rest) from argv: one word, or two for `data synth` / `tokenizer train`."""
    for n in (2, 1):
        name = " ".join(argv[:n])
        if len(argv) >= n and name in COMMANDS:
            return name, argv[n:]
    return None, argv


def reference_markdown() -> str:
    """docs/commands.md: every command with every option, from the Options classes themselves."""
    out = ["# Commands and their options", "",
           "Generated from the commands' Options classes (`python -m tinygpt.commands > docs/commands.md`); "
           "every option is also a `--config FILE.yaml` key (the field name or the flag, with - or _).", ""]
    for name, (_, help_text) in COMMANDS.items():
        out += [f"## tinygpt {name}", "", help_text + ".", "", "| option | meaning |", "|---|---|"]
        for title, members in grouped(command(name).options):
            out.append(f"| **{title}** | |")
            for s in members:
                if s.meta["positional"]:
                    names = [s.name.upper()]
                elif s.meta["negate"]:      # an automatic switch has both spellings
                    names = [s.flag, s.meta["negate"]] if s.default is None else [s.meta["negate"]]
                else:
                    names = [s.flag, *s.meta["aliases"]]
                flags = ", ".join(f"`{f}`" for f in names)
                choices = f" ({', '.join(map(str, s.meta['choices']))})" if s.meta["choices"] else ""
                req = " Required." if s.meta["required"] else ""
                out.append(f"| {flags} | {_help(s).replace('%%', '%').replace('|', '/')}{choices}{req} |")
        out.append("")
    return "\n".join(out)
