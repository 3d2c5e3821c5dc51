"""Options are declared once: for every option of every command, a flag and the same key in a
--config file give the same Options (or fail with the same message), values are checked before any
work, and a parsed command line written back out (`to_argv`) parses to the same options."""
from dataclasses import dataclass

import pytest

from tinygpt.commands import COMMANDS, command
from tinygpt.errors import UserError
from tinygpt.options import Options, _base, _help, at_least, convert, option, parse, specs, to_argv

SAMPLES = {int: [3, 1, 8, 300, 2000], float: [0.5, 0.25, 0.01, 2.0, 300.0], str: ["m.tinygpt", "x", "a,b", "cpu", "best"]}
BAD = {int: "seven", float: "nan"}


def _valid(spec):
    """A value this option accepts (its default when that is one)."""
    kind, is_list, _ = _base(spec.type)
    if spec.meta["choices"]:
        return [spec.meta["choices"][-1]] if is_list else spec.meta["choices"][-1]
    if kind is bool:
        return not spec.default if spec.default is not None else True
    for v in SAMPLES[kind]:
        try:
            convert(spec, [v] if is_list else v, None)
            return [v] if is_list else v
        except UserError:
            continue
    raise AssertionError(f"no sample value for {spec.name}")


def _flag_tokens(spec, value) -> list[str]:
    m = spec.meta
    if m["positional"]:
        return [str(value)]
    if isinstance(value, bool):      # a negated switch gives False; an automatic (None) one has both
        return [m["negate"]] if m["negate"] and not value else [spec.flag]
    if isinstance(value, list):
        return [spec.flag, *map(str, value)] if m["many"] else [t for v in value for t in (spec.flag, str(v))]
    return [spec.flag, str(value)]


def _required(cls, skip: str) -> dict:
    return {s.name: _valid(s) for s in specs(cls) if s.meta["required"] and s.name != skip}


def _outcome(fn):
    try:
        return "ok", fn()
    except UserError as e:
        return "error", e.what


def _yaml(tmp_path, mapping) -> str:
    import yaml
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return str(path)


CASES = [(name, s.name) for name in COMMANDS for s in specs(command(name).options) if s.meta["cli"]]


@pytest.mark.parametrize("name,field", CASES, ids=[f"{n}:{f}" for n, f in CASES])
def test_flag_and_config_key_agree(name, field, tmp_path):
    cmd = command(name)
    spec = next(s for s in specs(cmd.options) if s.name == field)
    base = _required(cmd.options, field)
    base_argv = [t for s in specs(cmd.options) if s.name in base for t in _flag_tokens(s, base[s.name])]
    value = _valid(spec)
    by_flag = _outcome(lambda: cmd.parse(base_argv + _flag_tokens(spec, value)))
    by_key = _outcome(lambda: cmd.parse(base_argv + ["--config", _yaml(tmp_path, {field: value})]))
    negated = bool(spec.meta["negate"]) and value is False
    dashed = field.replace("_", "-") if not negated else spec.meta["negate"].lstrip("-")
    by_dashed = _outcome(lambda: cmd.parse(base_argv + ["--config", _yaml(
        tmp_path, {dashed: (not value) if negated else value})]))
    assert by_flag == by_key == by_dashed
    if by_flag[0] == "ok":
        opts = by_flag[1]
        assert getattr(opts, field) == value
        assert cmd.parse(to_argv(opts)) == opts                       # the command line round-trips
    # a wrong value fails the same way as a flag and as a key, naming the option
    kind, is_list, _ = _base(spec.type)
    bad = "nope" if spec.meta["choices"] else BAD.get(kind)
    if bad is not None and not spec.meta["positional"]:
        err_flag = _outcome(lambda: cmd.parse(base_argv + [spec.flag, bad]))
        err_key = _outcome(lambda: cmd.parse(base_argv + ["--config", _yaml(tmp_path, {field: bad})]))
        assert err_flag[0] == "error" and err_flag == err_key and spec.flag in err_flag[1]


def test_every_command_has_a_help_and_options_with_help_text():
    for name in COMMANDS:
        cmd = command(name)
        assert cmd.help
        for s in specs(cmd.options):
            assert s.meta["help"], (name, s.name)


@dataclass
class _Toy(Options):
    command = "toy"
    n: int = option(2, "a count", check=at_least(1))
    rate: float | None = option(None, "a rate")
    names: list[str] = option([], "names", repeat=True)
    on: bool = option(True, "turn it off", negate="--off")


def test_values_are_converted_and_checked_the_same_from_every_source(tmp_path):
    assert parse(_Toy, ["--n", "5", "--names", "a", "--names", "b", "--off"], "tinygpt toy") == \
        _Toy(n=5, names=["a", "b"], on=False)
    assert _Toy(n="7").n == 7                                           # the API converts too
    for bad, what in ((["--n", "0"], "--n must be >= 1, got '0'"), (["--n", "1.5"], "--n must be an integer"),
                      (["--rate", "inf"], "--rate must be a finite number")):
        with pytest.raises(UserError, match=what):
            parse(_Toy, bad, "tinygpt toy")
    with pytest.raises(UserError, match="--n must be >= 1, got 0"):
        _Toy(n=0)
    path = tmp_path / "t.yaml"
    path.write_text("n: 0\n")
    with pytest.raises(UserError) as e:
        parse(_Toy, ["--config", str(path)], "tinygpt toy")
    assert e.value.what == "--n must be >= 1, got 0" and e.value.where == str(path)
    path.write_text("'off': true\nrate: 0.5\n")
    assert parse(_Toy, ["--config", str(path)], "tinygpt toy") == _Toy(on=False, rate=0.5)
    assert parse(_Toy, ["--config", str(path), "--rate", "0.25"], "tinygpt toy").rate == 0.25   # flags win


def test_the_command_reference_in_docs_is_up_to_date():
    from pathlib import Path
    from tinygpt.commands import reference_markdown
    doc = Path(__file__).resolve().parents[1] / "docs" / "commands.md"
    assert doc.read_text() == reference_markdown() + "\n", "run: python -m tinygpt.commands > docs/commands.md"


def _outside(spec) -> list:
    """Values just outside the range of a numeric option (from its check's bounds), and the
    non-finite ones for floats."""
    kind, _, _ = _base(spec.type)
    lo, hi, lo_open, hi_open = spec.meta["check"].bounds
    step = 1 if kind is int else 1e-6 * max(1.0, abs(lo if lo is not None else hi))
    out = []
    if lo is not None:
        out.append(lo if lo_open else lo - step)
    if hi is not None:
        out.append(hi if hi_open else hi + step)
    if kind is float:
        out += ["nan", "inf", "-inf"]
    return [int(v) if kind is int and not isinstance(v, str) else v for v in out]


NUMERIC = [(name, s.name) for name, _ in [(n, None) for n in COMMANDS] for s in specs(command(name).options)
           if s.meta["cli"] and _base(s.type)[0] in (int, float) and not s.meta["choices"]]


@pytest.mark.parametrize("name,field", NUMERIC, ids=[f"{n}:{f}" for n, f in NUMERIC])
def test_every_numeric_option_has_a_range_and_refuses_values_outside_it(name, field):
    """For every numeric option of every command: a declared range, shown in --help; every value
    just outside it (and NaN, inf for floats) is a one-line error naming the flag, and the value
    at a closed bound is accepted."""
    cmd = command(name)
    spec = next(s for s in specs(cmd.options) if s.name == field)
    assert getattr(spec.meta["check"], "bounds", None), f"{name} {spec.flag} has no range"
    assert spec.meta["check"].range in _help(spec)
    base = _required(cmd.options, field)
    base_argv = [t for s in specs(cmd.options) if s.name in base for t in _flag_tokens(s, base[s.name])]
    for bad in _outside(spec):
        with pytest.raises(UserError) as e:
            cmd.parse(base_argv + [spec.flag, str(bad)])
        assert spec.flag in e.value.what, (name, spec.flag, bad, e.value.what)
    lo, hi, lo_open, hi_open = spec.meta["check"].bounds
    for edge in ([lo] if lo is not None and not lo_open else []) + ([hi] if hi is not None and not hi_open else []):
        convert(spec, [edge] if _base(spec.type)[1] else edge, None)           # the bound itself is allowed
@dataclass
class _Tri(Options):
    command = "tri"
    on: bool | None = option(None, "automatic unless given", negate="--no-on")


def test_an_automatic_switch_has_both_spellings(tmp_path):
    p = lambda argv: parse(_Tri, argv, "tinygpt tri")   # noqa: E731
    assert (p([]).on, p(["--on"]).on, p(["--no-on"]).on) == (None, True, False)
    for mapping, want in (({"on": False}, False), ({"no-on": True}, False), ({"on": True}, True)):
        assert p(["--config", _yaml(tmp_path, mapping)]).on is want
    for value in (True, False):
        assert p(to_argv(_Tri(on=value))).on is value
