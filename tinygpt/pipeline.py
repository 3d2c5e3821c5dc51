"""`tinygpt pipeline`: the whole recipe as one resumable command, driven by a small YAML file.

    name: demo
    defaults: {quiet: true, device: auto}      # given to every stage whose command has the flag
    stages:
      - {name: data, cmd: data synth, out: data}
      - {name: base, cmd: train, args: {corpus: "${data}/corpus.txt", preset: tiny, steps: 200}}
      - {name: sft,  cmd: sft, model: "${base}", args: {data: "${data}/sft.jsonl"}}
      - {name: eval-sft, cmd: eval, model: "${base}", args: {lora: "${sft}", tasks: synth, label: SFT}}

Design choices:
- A stage IS a `tinygpt` command: its `args` are read exactly like a `--config` file of that
  command (the same keys, the same checks; `model` is the positional argument) into the
  command's Options, which the command registry then runs in-process, as the command line does
  (torch is imported once). There is no second implementation of any stage.
- Wiring: every stage writes one artifact, `out` (default `<run>/<name><ext>`, the extension
  chosen by the command). `${name}` in any value is that stage's artifact, `${run}` the run folder.
  `--out` is passed only to commands that take it; a command without one (`sample`) has what it
  prints saved as its artifact (`<run>/<name>.txt`).
  Stages run in the order listed; a reference to a later stage is an error.
- Resumable: each stage's key hashes its command, its resolved arguments and the CONTENT of every
  existing file or folder its arguments name (its own output excluded). A stage whose key matches
  the state file (`pipeline.json` in the run folder) and whose artifact exists is skipped; a change
  anywhere upstream changes the bytes of an input and so re-runs everything after it.
- A stage that fails (a user error, or a bug) is recorded with its error and stops the run;
  everything finished stays recorded and is skipped next time. The state file is written
  atomically after every transition, so an interrupted run never loses a finished stage.
  Ctrl-C or SIGTERM inside a stage records it as `interrupted` (a training stage saves its resume
  state on the way out); the next run resumes that training stage from its saved state when the
  stage's settings are the same (the engine refuses a state that does not match; then the stage
  starts again). Stages with `save_every` also resume after a hard kill.
- `extends: demo` reuses another config's stages and adds more (demo-rl = demo + GRPO), so one
  run folder serves both and the shared stages run once.
- Commands are checked against this installation before anything runs (a typo, or a command not
  available here, fails at once, not after an hour of pretraining).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import torch
import yaml

from .commands import command
from .device import check_device_name
from .errors import UserError
from .io import atomic_write_text, check_writable
from .options import Options, knows, option, to_argv
from .report import STATE_FILE, build_report, compare_line, read_state
from .train.engine import run_dir_for
from .train.resume import STATE_FILE as STATE_FILE_TRAIN

EXTENSIONS = {"data synth": "", "tokenizer train": ".json", "train": ".tinygpt", "sft": ".lora",
              "reward": ".tinygpt", "dpo": ".lora", "orpo": ".lora", "simpo": ".lora", "kto": ".lora",
              "ppo": ".lora", "grpo": ".lora", "distill": ".lora", "generate": ".jsonl", "eval": ".json",
              "sample": ".txt"}
_REF = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_STAGE_KEYS = {"name", "cmd", "model", "out", "args"}


@dataclass
class Stage:
    name: str
    cmd: str
    model: str | None = None
    out: str | None = None
    args: dict = field(default_factory=dict)


@dataclass
class Pipeline:
    name: str
    stages: list
    defaults: dict = field(default_factory=dict)
    compare: list = field(default_factory=list)     # eval labels to print side by side at the end
    source: str = ""


# ---- loading and validation -------------------------------------------------------------------
def preset_path(name: str) -> Path:
    p = Path(str(resources.files("tinygpt") / "presets" / f"{name}.yaml"))
    if not p.exists():
        avail = sorted(q.stem for q in p.parent.glob("*.yaml"))
        raise UserError(f"unknown pipeline preset {name!r}", "--preset", f"choose one of {', '.join(avail)}")
    return p


def load_pipeline(path) -> Pipeline:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pipeline config not found: {path}", None, "pass a YAML file or --preset demo")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"invalid YAML ({str(e).splitlines()[0]})", str(path)) from None
    if isinstance(raw, dict) and raw.get("extends"):
        raw = _extend(raw, path)
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise UserError("a pipeline config needs a non-empty 'stages' list", str(path))
    unknown = set(raw) - {"name", "stages", "defaults", "compare"}
    if unknown:
        raise UserError(f"unknown top-level key {sorted(unknown)[0]!r}", str(path),
                        "use name, extends, defaults, stages, compare")
    stages, seen = [], set()
    for i, s in enumerate(raw["stages"], 1):
        where = f"{path} (stage {i})"
        if not isinstance(s, dict) or not {"name", "cmd"} <= set(s):
            raise UserError("a stage needs 'name' and 'cmd'", where)
        if set(s) - _STAGE_KEYS:
            raise UserError(f"unknown stage key {sorted(set(s) - _STAGE_KEYS)[0]!r}", where,
                            f"use {', '.join(sorted(_STAGE_KEYS))}")
        name = str(s["name"])
        if not _NAME.match(name) or name in seen or name == "run":
            raise UserError(f"bad or repeated stage name {name!r}", where, "use unique names of letters, digits, _ . -")
        if not isinstance(s.get("args", {}), dict):
            raise UserError("'args' must be a mapping of flag: value", where)
        for ref in _REF.findall(json.dumps([s.get("model"), s.get("out"), s.get("args", {})])):
            if ref != "run" and ref not in seen:
                raise UserError(f"stage {name!r} refers to ${{{ref}}}, which is not an earlier stage", where)
        seen.add(name)
        stages.append(Stage(name, str(s["cmd"]), s.get("model"), s.get("out"), dict(s.get("args") or {})))
    pipe = Pipeline(str(raw.get("name") or path.stem), stages, dict(raw.get("defaults") or {}),
                    list(raw.get("compare") or []), str(path))
    for st in pipe.stages:
        try:
            command(st.cmd)
        except UserError as e:
            raise UserError(e.what, f"{path} (stage {st.name})", e.fix) from None
    return pipe


def _extend(raw: dict, path: Path) -> dict:
    """`extends: demo` (a preset) or `extends: other.yaml` (beside this file): the parent's stages
    come first, then this file's; defaults merge (this file wins); name/compare are this file's."""
    ref = str(raw.pop("extends"))
    parent_path = path.parent / ref if ref.endswith((".yaml", ".yml")) else preset_path(ref)
    if not parent_path.is_file():
        raise UserError(f"extended config not found: {parent_path}", str(path))
    parent = yaml.safe_load(parent_path.read_text(encoding="utf-8")) or {}
    if parent.get("extends"):
        parent = _extend(parent, parent_path)
    return {"name": raw.get("name", parent.get("name")),
            "defaults": {**(parent.get("defaults") or {}), **(raw.get("defaults") or {})},
            "compare": raw.get("compare", parent.get("compare")),
            "stages": list(parent.get("stages") or []) + list(raw.get("stages") or []),
            **{k: v for k, v in raw.items() if k not in ("name", "defaults", "compare", "stages")}}


# ---- argument lists ---------------------------------------------------------------------------
def _subst(value, outs: dict, run: Path):
    if isinstance(value, list):
        return [_subst(v, outs, run) for v in value]
    if not isinstance(value, str):
        return value
    return _REF.sub(lambda m: str(run) if m.group(1) == "run" else str(outs[m.group(1)]), value)


def stage_out(stage: Stage, run: Path, outs: dict) -> Path:
    if stage.out:
        p = Path(_subst(stage.out, outs, run))
        return p if p.is_absolute() else run / p
    return run / f"{stage.name}{EXTENSIONS.get(stage.cmd, '.out')}"


def stage_options(stage: Stage, pipe: Pipeline, run: Path, outs: dict):
    """The stage's command and its Options: the pipeline defaults the command knows, then the
    stage's `args`, its `model` and its `out` (when the command writes one)."""
    cmd = command(stage.cmd)
    where = f"{pipe.source} (stage {stage.name})"
    values = {k: v for k, v in pipe.defaults.items() if knows(cmd.options, str(k))}
    values.update(stage.args)
    if stage.model is not None:
        values["model"] = stage.model
    if knows(cmd.options, "out"):   # else the stage's printed output becomes its artifact (see run_pipeline)
        values["out"] = str(outs[stage.name])
    values = {k: _subst(v, outs, run) for k, v in values.items()}
    return cmd, cmd.from_mapping({k: v for k, v in values.items() if v is not None and v is not False}, where)


# ---- content hashes ---------------------------------------------------------------------------
_HASHES: dict = {}


def content_hash(path: Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (names and bytes); memoised by mtime."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo in _HASHES:
        return _HASHES[memo]
    h = hashlib.sha256()
    files = sorted(q for q in path.rglob("*") if q.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else "").encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    _HASHES[memo] = h.hexdigest()
    return _HASHES[memo]


def stage_key(argv: list[str], out: Path, run: Path | None = None) -> str:
    """Hash of the command line plus the content of every existing path it names (out excluded).
    Paths inside the run folder enter as `${run}/...`, so a moved or copied run folder resumes."""
    shown = [a.replace(str(run), "${run}") for a in argv] if run is not None else argv
    h = hashlib.sha256(json.dumps(shown).encode())
    for tok in argv:
        for part in [tok] + ([tok.split("=", 1)[1]] if "=" in tok else []):
            p = Path(part)
            if part and p.resolve() != out.resolve() and p.exists():
                h.update(content_hash(p).encode())
    return h.hexdigest()[:20]


# ---- running ----------------------------------------------------------------------------------
def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores)"


def _write_state(run: Path, state: dict) -> None:
    atomic_write_text(run / STATE_FILE, json.dumps(state, indent=1) + "\n")


def invoke(cmd, opts, stdout_to: Path | None = None) -> None:
    """Run one command in-process exactly as the command line would (UserError propagates).
    `stdout_to`: save what the command prints to this file (written only when it succeeds)."""
    if stdout_to is None:
        cmd.run(opts)
        return
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cmd.run(opts)
    atomic_write_text(stdout_to, buf.getvalue())


def resumable(cmd, opts) -> bool:
    """A training stage whose run folder holds a saved state (from an interrupted run)."""
    return cmd.stage is not None and (run_dir_for(opts.out) / STATE_FILE_TRAIN).exists()


def run_stage(cmd, opts, resume: bool, stdout_to, log) -> None:
    """Run a stage, resuming its saved state when asked; a state the stage refuses (other settings,
    a damaged file) is set aside and the stage starts again."""
    if resume:
        try:
            invoke(cmd, replace(opts, resume=True), stdout_to)
            return
        except UserError as e:
            if not e.what.startswith("--resume"):
                raise
            log(f"cannot resume ({e.what}); starting the stage again")
    invoke(cmd, opts, stdout_to)


def run_pipeline(config, out=None, force: bool = False, log=print, device: str | None = None) -> dict:
    """Run (or resume) a pipeline; returns the final state. `config`: a YAML path; `device`
    overrides the config's default device for every stage that takes one."""
    pipe = load_pipeline(config)
    if device:
        pipe.defaults["device"] = device
    run = Path(out) if out else Path("runs") / pipe.name
    check_writable(run, folder=True)
    run.mkdir(parents=True, exist_ok=True)
    state = read_state(run)
    state.update({"name": pipe.name, "config": str(pipe.source), "hardware": hardware(),
                  "order": [s.name for s in pipe.stages], "compare": pipe.compare})
    outs: dict = {}
    for i, st in enumerate(pipe.stages, 1):
        outs[st.name] = stage_out(st, run, outs)
        cmd, opts = stage_options(st, pipe, run, outs)
        argv = st.cmd.split() + to_argv(opts)
        key = stage_key(argv, outs[st.name], run)
        rec = state["stages"].get(st.name, {})
        head = f"[{i}/{len(pipe.stages)}] {st.name}"
        if not force and rec.get("status") == "done" and rec.get("key") == key and outs[st.name].exists():
            log(f"{head}: up to date, skipped")
            continue
        resume = not force and rec.get("key") == key and resumable(cmd, opts)
        log(f"{head}: tinygpt {' '.join(argv)}" + (" (resuming its saved state)" if resume else ""))
        rec = {"cmd": st.cmd, "argv": argv, "key": key, "out": str(outs[st.name]), "status": "running",
               "started": time.time(), "hardware": state["hardware"]}
        state["stages"][st.name] = rec
        _write_state(run, state)
        t0 = time.perf_counter()
        try:
            run_stage(cmd, opts, resume, None if knows(cmd.options, "out") else outs[st.name], log)
        except Exception as e:
            rec.update(status="failed", error=str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}",
                       seconds=round(time.perf_counter() - t0, 2), finished=time.time())
            _write_state(run, state)
            if isinstance(e, UserError):
                raise UserError(f"stage '{st.name}' failed: {e}", str(run / STATE_FILE),
                                "fix it and run the same command again (finished stages are kept)") from None
            raise
        except KeyboardInterrupt:
            rec.update(status="interrupted", finished=time.time())
            _write_state(run, state)
            raise
        rec.update(status="done", seconds=round(time.perf_counter() - t0, 2), finished=time.time())
        _write_state(run, state)
        log(f"{head}: done in {rec['seconds']:.1f}s")
    return state


@dataclass
class PipelineOptions(Options):
    command = "pipeline"
    config: str | None = option(None, "pipeline YAML (stages and their options)", positional=True)
    preset: str | None = option(None, "a built-in pipeline: demo, demo-rl, distill")
    out: str | None = option(None, "run folder", auto="runs/<name>")
    force: bool = option(False, "re-run every stage, even those up to date")
    device: str | None = option(None, "device for every stage", auto="the config's, else auto",
                                check=lambda v: None if v is None else check_device_name(v))

    def check(self) -> None:
        if bool(self.config) == bool(self.preset):
            raise UserError("give a pipeline CONFIG.yaml or --preset NAME (one of them)", "tinygpt pipeline",
                            "e.g. 'tinygpt pipeline --preset demo'")


def run_and_report(config, out=None, force: bool = False, device: str | None = None, log=print) -> dict:
    """Run or resume the stages, then write the report; returns {"state", "run", "report"} where
    report holds the paths and the terminal table."""
    pipe_state = run_pipeline(config, out, force, log, device)
    run = Path(out) if out else Path("runs") / pipe_state["name"]
    return {"state": pipe_state, "run": run, "report": build_report(run)}


def pipeline_command(opts: PipelineOptions) -> None:
    res = run_and_report(preset_path(opts.preset) if opts.preset else opts.config, opts.out, opts.force,
                         opts.device, log=lambda *m: print(*m, flush=True))
    rep = res["report"]
    print("\n" + rep["table"])
    line = compare_line(rep["evals"], rep["compare"])
    if line:
        print(line)
    print(f"report: {rep['html'].resolve()}")
