"""User-facing errors.

A `UserError` is a mistake the user can fix (missing file, malformed row, bad flag value).
The command line catches it and prints one line, `tinygpt: error: <what>, <where>, <what to do>`,
then exits with status 2. Anything else is a bug and may raise with a traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; printed as one line, exit code 2."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(", ".join(p for p in (what, where, fix) if p))


class DataError(UserError):
    """A malformed data file or row. `where` names the file and, when known, the line."""

    def __init__(self, what: str, path=None, line: int | None = None, fix: str | None = None):
        where = None
        if path is not None:
            where = f"{path}:{line}" if line is not None else str(path)
        self.path, self.line = path, line
        super().__init__(what, where, fix)


class Notice(UserWarning):
    """Something the user should know that does not stop the command (rows skipped, a file saved
    by an interrupted run). The command line prints it as one line, `tinygpt: warning: ...`."""
