"""The errors jaxlcd raises on purpose.

Every exception class jaxlcd defines derives from `JaxlcdError`; its message is one sentence that names the thing
and the fix. The CLIs print that sentence and exit with status 2; any other exception is a bug (in jaxlcd or below
it) and keeps its traceback. Most classes also derive from ValueError, as the errors they replace did.
"""


class JaxlcdError(Exception):
    """Base of every error jaxlcd raises on purpose (a user mistake or a stop it decided on)."""


class InputError(JaxlcdError, ValueError):
    """A bad value, path, file or record given to jaxlcd (config, model folder, data, command line)."""


class ConfigKeyError(InputError):
    """An override names a config key that does not exist (a typo or a renamed key)."""


class TrainingError(JaxlcdError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is left untouched."""


class MissingFileError(JaxlcdError, FileNotFoundError):
    """A file or folder jaxlcd was pointed at does not exist or lacks what it needs."""


class WriteError(JaxlcdError, OSError):
    """A file of the run could not be written (disk full, no permission, a path through a file); checkpoints already
    written are left as they are."""


def describe_os_error(error: OSError) -> str:
    """One sentence for an OSError met on the run's files (a full disk, no permission, ...): path, reason, remedy."""
    path = f" {error.filename!r}" if error.filename else ""
    hint = {28: "free some space (or use another workdir) and rerun the same command to resume",
            27: "the file size limit was reached; raise it (ulimit -f) and rerun the same command to resume",
            13: "use a workdir you can write to", 1: "use a workdir you can write to",
            30: "the filesystem is read-only; use another workdir",
            20: "a part of the path is a file, not a folder; choose another path",
            2: "a folder on the path is missing"}.get(error.errno, "rerun the same command to resume")
    return f"cannot read or write{path}: {error.strerror or error}; {hint} (checkpoints already written are intact)"
