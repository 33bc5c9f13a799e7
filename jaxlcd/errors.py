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
