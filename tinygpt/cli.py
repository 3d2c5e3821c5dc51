"""The `tinygpt` command line: a thin layer over the command registry (`commands/__init__.py`).

`tinygpt COMMAND [options]`: each command's Options dataclass is its flags and its `--config
FILE.yaml` keys (`options.py`), so nothing here knows any option. A user mistake prints one line
`tinygpt: error: <what>, <where>, <what to do>` and exits 2; Ctrl-C exits 130. Writes go through
`io` (atomic, their OSErrors already one-line errors); an OSError of the machine's state that
still reaches here (a full disk, a read-only file system, no permission) is printed the same
way rather than as a traceback.
"""
from __future__ import annotations

import errno
import signal
import sys
import threading
import warnings

from .commands import COMMANDS, command, split_command
from .errors import Notice, UserError
from .io import write_error

USAGE = "usage: tinygpt COMMAND [options]   (tinygpt COMMAND --help for its options)"
MACHINE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def overview() -> str:
    width = max(map(len, COMMANDS))
    lines = [USAGE, "", "The modern LLM recipe at small scale. Commands:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def parse_args(argv: list[str]):
    """(Command, its options) for a command line (raises UserError)."""
    name, rest = split_command(list(argv))
    if name is None:
        word = argv[0] if argv else ""
        groups = sorted({n.split()[0] for n in COMMANDS if " " in n and n.split()[0] == word})
        if groups:
            actions = [n.split()[1] for n in COMMANDS if n.startswith(word + " ")]
            raise UserError(f"'tinygpt {word}' needs an action: {', '.join(actions)}", None,
                            f"e.g. 'tinygpt {word} {actions[0]} --help'")
        raise UserError(f"unknown command '{word}'", None, "see 'tinygpt --help'")
    cmd = command(name)
    return cmd, cmd.parse(rest)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(f"tinygpt: warning: {message}\n" if issubclass(category, Notice)
                     else warnings.formatwarning(message, category, filename, lineno, line))


def _interrupt(signum, frame):
    raise KeyboardInterrupt     # SIGTERM takes the Ctrl-C path: training saves its state, stages record it


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        return 0
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        cmd, opts = parse_args(argv)
        if main_thread and not getattr(cmd.run, "manages_signals", False):   # the server shuts down itself
            signal.signal(signal.SIGTERM, _interrupt)
        with warnings.catch_warnings():    # notices (skipped rows, ...) are shown even with --quiet
            warnings.simplefilter("always", Notice)
            warnings.showwarning = _show_warning
            cmd.run(opts)
        return 0
    except UserError as e:
        print(f"tinygpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tinygpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:
        if e.errno not in MACHINE_ERRNOS:
            raise
        print(f"tinygpt: error: {write_error(e.filename or 'a file', e)}", file=sys.stderr)
        return 2
    except SystemExit as e:              # --help
        return e.code if isinstance(e.code, int) else 0
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
