"""Options declared once: each command's options are one dataclass, and each field says everything.

    @dataclass
    class SampleOptions(Options):
        model: str = option(None, "a .tinygpt file or Hugging Face folder", positional=True, required=True)
        temperature: float = option(0.8, "0 = greedy", check=at_least(0))

From such a class come the command line (`build_parser`: flags, help, defaults), the keys of
`--config FILE.yaml` (the field name or the flag, with - or _) and the Python API (construct the
dataclass). Design choices:
- Values from a flag and from a YAML file pass through ONE converter (`convert`), so a wrong
  value fails with the same message either way; only the place named differs. argparse only
  splits the command line: every option is read as text (switches as True) and converted here.
- Precedence: the field's default < `--config` < the command line.
- Every field check (`check=`, choices, finiteness of floats) runs in `__post_init__`, so an
  Options object that exists is valid, however it was built; cross-field rules go in a class's
  `check()` method. All of it runs before any work starts.
- `None` is the "automatic" value of a field whose default depends on others (a learning rate
  that depends on --full, a budget that depends on the model's context); its help says the rule.
- Fields are grouped in `--help` by the class that declares them (a mixin's `group` name).
"""
from __future__ import annotations

import argparse
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import yaml

from .errors import UserError

# ---- declaring -------------------------------------------------------------------------------


def option(default=None, help: str = "", *, flag: str | None = None, aliases: tuple = (), positional: bool = False,
           required: bool = False, choices=None, check=None, repeat: bool = False, many: bool = False,
           negate: str | None = None, metavar: str | None = None, auto: str | None = None,
           cli: bool = True, finite: bool = True):
    """A dataclass field that is also a command-line option.

    flag: the flag (default `--field-name`); aliases: more spellings of it. positional: the
    command's positional argument. required: must be given (by flag, config or API).
    choices / check: allowed values / a function value -> error text or None (see `at_least`).
    repeat: the flag may be given several times (a list); many: one flag, several values.
    negate: a switch that sets a True-by-default bool to False (`--no-packing`); on a bool whose
    default is None (automatic), the flag sets True and `negate` sets False. auto: help text
    for the automatic (None) default. cli=False: Python API only. finite: floats must be finite."""
    meta = dict(help=help, flag=flag, aliases=tuple(aliases), positional=positional, required=required,
                choices=tuple(choices) if choices is not None else None, check=check, repeat=repeat, many=many,
                negate=negate, metavar=metavar, auto=auto, cli=cli, finite=finite)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"option": meta})
    return field(default=default, metadata={"option": meta})


# value checks: each returns None when the value is fine, else what is wrong with it. The range
# checks carry their bounds (`check.bounds` = (lo, hi, lo_open, hi_open), None for no bound) and
# their text (`check.range`), which --help shows and the tests generate out-of-range values from.
def between(lo, hi, lo_open: bool = False, hi_open: bool = False):
    if lo is None:
        text = f"{'<' if hi_open else '<='} {hi}"
    elif hi is None:
        text = f"{'>' if lo_open else '>='} {lo}"
    else:
        text = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

    def check(v):
        if v is None:
            return None
        ok = (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
        return None if ok else f"must be {text}"
    check.bounds, check.range = (lo, hi, lo_open, hi_open), text
    return check


def at_least(lo):
    return between(lo, None)


def above(lo):
    return between(lo, None, lo_open=True)


def each(check):
    """Apply `check` to every item of a list value."""
    def run(v):
        for x in v or ():
            msg = check(x)
            if msg:
                return msg
        return None
    run.bounds, run.range = getattr(check, "bounds", None), getattr(check, "range", None)
    return run


SEED = between(0, 2**32 - 1)       # what every seed option accepts


@dataclass
class Spec:
    """One option as the parser and the converter see it."""
    name: str
    type: object
    default: object
    meta: dict

    @property
    def flag(self) -> str:
        return self.meta["flag"] or "--" + self.name.replace("_", "-")

    @property
    def label(self) -> str:
        """How messages name the option: its flag, or the positional's name."""
        return self.name.upper() if self.meta["positional"] else self.flag


class Options:
    """Base class of every command's options (a dataclass subclass). Constructing one checks it."""

    group = "options"

    def __post_init__(self):
        for spec in specs(type(self)):
            setattr(self, spec.name, convert(spec, getattr(self, spec.name), None, getattr(self, "command", None)))
        self.check()

    def require(self) -> None:
        """Options marked required are given (the command line and config files need them; the
        Python API may pass the objects they name instead, e.g. a loaded model)."""
        for spec in specs(type(self)):
            v = getattr(self, spec.name)
            if spec.meta["required"] and spec.meta["cli"] and (v is None or v is False or v == []):
                raise UserError(f"{spec.label} is required", None, _help_hint(self))

    def check(self) -> None:
        """Cross-field rules (override); raise UserError naming the flags."""


def _help_hint(opts) -> str | None:
    cmd = getattr(type(opts), "command", None)
    return f"see 'tinygpt {cmd} --help'" if cmd else None


_SPECS: dict = {}


def specs(cls) -> list[Spec]:
    """The options of an Options dataclass, in declaration order."""
    if cls not in _SPECS:
        hints = typing.get_type_hints(cls)
        out = []
        for f in fields(cls):
            if "option" not in f.metadata:
                continue
            default = f.default if f.default is not MISSING else f.default_factory()
            out.append(Spec(f.name, hints[f.name], default, f.metadata["option"]))
        _SPECS[cls] = out
    return _SPECS[cls]


# ---- converting one value ----------------------------------------------------------------------
def _base(tp):
    """(scalar type, is_list, optional) of an annotation like int, float | None, list[str]."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    optional = False
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        tp = rest[0]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        return args[0] if args else str, True, optional
    return tp, False, optional


def _scalar(kind, value, spec: Spec):
    """value (text from the command line, or a YAML scalar) -> kind, or raise ValueError(reason)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"is a switch: give true or false, got {value!r}")
    if isinstance(value, (list, dict, bool)) or value is None:
        raise ValueError(f"takes {'a number' if kind in (int, float) else 'one value'}, got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"must be an integer, got {value!r}")
        try:
            return int(value) if not isinstance(value, str) else int(value.strip())
        except ValueError:
            raise ValueError(f"must be an integer, got {value!r}") from None
    if kind is float:
        try:
            x = float(value)
        except ValueError:
            raise ValueError(f"must be a number, got {value!r}") from None
        if spec.meta["finite"] and not math.isfinite(x):
            raise ValueError(f"must be a finite number, got {value!r}")
        return x
    return str(value)


def convert(spec: Spec, value, where: str | None, command: str | None = None):
    """Check and convert one option's value (text from the command line, a YAML value, or a
    Python value); raise UserError naming the option, `where` (None: the command line or the API)
    and the command's help."""
    kind, is_list, _ = _base(spec.type)

    def fail(reason):
        return UserError(f"{spec.label} {reason}", where, f"see 'tinygpt {command} --help'" if command else None)
    if value is None:
        return [] if is_list else None
    try:
        if is_list:
            if isinstance(value, str) and not (spec.meta["repeat"] or spec.meta["many"]):
                value = [v.strip() for v in value.split(",") if v.strip()]   # a comma-separated list
            out = [_scalar(kind, v, spec) for v in (value if isinstance(value, (list, tuple)) else [value])]
        elif isinstance(value, (list, tuple)):
            raise ValueError(f"takes one value, got a list {list(value)!r}")
        else:
            out = _scalar(kind, value, spec)
    except ValueError as e:
        raise fail(str(e)) from None
    choices = spec.meta["choices"]
    if choices is not None:
        bad = [v for v in (out if is_list else [out]) if v not in choices]
        if bad:
            raise fail(f"must be one of {', '.join(map(str, choices))}, got {bad[0]!r}")
    msg = spec.meta["check"](out) if spec.meta["check"] else None
    if msg:
        raise fail(f"{msg}, got {value!r}")
    return out


# ---- the command line --------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the command's help, exit code 2."""

    def error(self, message):
        raise UserError(message, f"'{self.prog}'", f"see '{self.prog} --help'")


def _help(spec: Spec) -> str:
    m = spec.meta
    text, notes = m["help"] or "", []
    if m["auto"]:
        notes.append(f"default: {m['auto']}")
    elif spec.default is not None and not isinstance(spec.default, bool) and spec.default != []:
        shown = ",".join(map(str, spec.default)) if isinstance(spec.default, (list, tuple)) else spec.default
        notes.append(f"default: {shown}")
    if getattr(m["check"], "range", None):
        notes.append(m["check"].range)
    if notes:
        text += f" ({'; '.join(notes)})"
    return text.replace("%", "%%").strip()


def grouped(cls) -> list[tuple[str, list[Spec]]]:
    """The command-line options of `cls` by --help section, the command's own sections first."""
    owners, groups = _owners(cls), {}
    for spec in specs(cls):
        if spec.meta["cli"]:
            groups.setdefault(owners.get(spec.name, "options"), []).append(spec)
    return list(reversed(groups.items()))


def build_parser(cls, prog: str, description: str = "") -> Parser:
    """The argparse parser of an Options class: every option read as text (switches as True), so
    `convert` does all checking; absent options stay absent (argument_default=SUPPRESS)."""
    p = Parser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    for title, members in grouped(cls):
        g = p.add_argument_group(title)
        for spec in members:
            _add_argument(g, spec)
    p.add_argument("--config", dest="_config_file", metavar="FILE.yaml",
                   help="read these options from a YAML file (flags win)")
    return p


def _add_argument(g, spec: Spec) -> None:
    m = spec.meta
    kind, is_list, _ = _base(spec.type)
    if m["positional"]:
        g.add_argument(spec.name, nargs="?", help=_help(spec), metavar=m["metavar"] or spec.name.upper())
    elif kind is bool:
        if m["negate"]:
            both = spec.default is None       # an automatic (None) switch: --x sets True, --no-x False
            g.add_argument(m["negate"], dest=spec.name, action="store_const", const=False,
                           help=f"set {spec.flag} false" if both else _help(spec))
        if not m["negate"] or spec.default is None:
            g.add_argument(spec.flag, *m["aliases"], dest=spec.name, action="store_const", const=True,
                           help=_help(spec))
    else:
        kw = dict(dest=spec.name, help=_help(spec), metavar=m["metavar"] or spec.name.upper())
        if m["choices"] is not None:
            kw["metavar"] = "{" + ",".join(map(str, m["choices"])) + "}"
        if is_list and m["many"]:
            kw["nargs"] = "+"
        elif is_list:
            kw["action"] = "append"
        g.add_argument(spec.flag, *m["aliases"], **kw)


def _owners(cls) -> dict:
    """field name -> the `group` of the class that first declares it (for --help sections; a
    subclass that only changes a default keeps the option in its original group)."""
    out = {}
    for klass in reversed(cls.__mro__):
        for name in klass.__dict__.get("__annotations__", {}):
            out.setdefault(name, klass.__dict__.get("group", getattr(klass, "group", "options")))
    return out


def _config_keys(cls) -> dict:
    """Every spelling a --config key may use -> (field, negated)."""
    keys = {}
    for spec in specs(cls):
        for name in [spec.name, spec.flag, *spec.meta["aliases"]]:
            keys[name.lstrip("-").replace("_", "-")] = (spec, False)
        if spec.meta["negate"]:
            keys[spec.meta["negate"].lstrip("-")] = (spec, True)
    return keys


def knows(cls, key: str) -> bool:
    """Whether `key` (a field name or flag, - or _) names an option of `cls`."""
    return str(key).lstrip("-").replace("_", "-") in _config_keys(cls)


def read_config(path) -> dict:
    """The mapping in a --config YAML file (a user error when missing or malformed)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}", "--config", "check the path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"invalid YAML ({str(e).splitlines()[0]})", str(path), "fix the file") from None
    if not isinstance(data, dict):
        raise UserError("a --config file must be a mapping of option: value", str(path))
    return data


def values_from_mapping(cls, mapping: dict, where: str) -> dict:
    """Converted field values from a mapping keyed like --config files (unknown keys refused)."""
    keys, out = _config_keys(cls), {}
    for key, value in mapping.items():
        hit = keys.get(str(key).lstrip("-").replace("_", "-"))
        if hit is None or not hit[0].meta["cli"]:
            raise UserError(f"unknown option '{key}'", where, f"see 'tinygpt {getattr(cls, 'command', '')} --help'")
        spec, negated = hit
        v = convert(spec, value, where, getattr(cls, "command", None))
        out[spec.name] = (not v) if negated else v
    return out


def parse(cls, argv: list[str], prog: str, description: str = ""):
    """Options of `cls` from a command line (with its `--config FILE.yaml`)."""
    ns = vars(build_parser(cls, prog, description).parse_args(argv))
    config = ns.pop("_config_file", None)
    values = values_from_mapping(cls, read_config(config), str(config)) if config else {}
    by_name = {s.name: s for s in specs(cls)}
    for name, v in ns.items():
        values[name] = convert(by_name[name], v, None, getattr(cls, "command", None))
    opts = cls(**values)
    opts.require()
    return opts


def to_argv(opts) -> list[str]:
    """A command line that gives `opts` (options left at their default are left out)."""
    out, pos = [], []
    for spec in specs(type(opts)):
        v = getattr(opts, spec.name)
        if not spec.meta["cli"] or v == spec.default or v is None:
            continue
        m = spec.meta
        if m["positional"]:
            pos.append(str(v))
        elif isinstance(v, bool):
            out.append(m["negate"] if m["negate"] and v is False else spec.flag)
        elif isinstance(v, (list, tuple)):
            out += [spec.flag, *map(str, v)] if m["many"] else [t for x in v for t in (spec.flag, str(x))]
        else:
            out += [spec.flag, str(v)]
    return pos + out
