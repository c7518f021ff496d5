"""Expected failures: the CLI prints these as one line (no traceback unless --debug).

Anything else that escapes a stage is a bug and is shown with its traceback.
"""

from __future__ import annotations


class BatctlError(Exception):
    """An expected failure: bad input, a refused overwrite, a held lock. Exit code 1."""

    exit_code = 1


class UsageError(BatctlError):
    """The command line or config file is wrong (unknown flag value, missing flag). Exit code 2."""

    exit_code = 2


class UpToDate(Exception):
    """The output already holds exactly what this run would produce: nothing to do, exit 0."""

    def __init__(self, path: object) -> None:
        super().__init__(f"{path} is up to date")
        self.path = path


class BadSampleError(BatctlError):
    """One pool or adaptation sample cannot be read: names the file, the sample key and the fix."""

    def __init__(self, file: object, key: str | None, problem: str, fix: str = "") -> None:
        where = f"{file}" + (f" [{key}]" if key is not None else "")
        msg = f"{where}: {problem}" + (f" ({fix})" if fix else "")
        super().__init__(msg)
        self.file = str(file)
        self.key = key
        self.problem = problem
        self.fix = fix
