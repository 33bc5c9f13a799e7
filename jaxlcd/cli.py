"""What every jaxlcd command line shares: finding config files, one-sentence errors, logging.

Config files: ``--config=configs/rglcd.py:tiny`` is read as given when that file exists (a user's own config, or
the repository's ``configs/`` from its root); otherwise a path ending in ``configs/NAME.py`` (or just ``NAME.py``)
is found among the configs shipped inside the package (``jaxlcd/configs``), so the commands work from any
directory.
"""
from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import sys

import ml_collections

from jaxlcd.errors import ConfigKeyError, InputError, JaxlcdError

PACKAGE_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
MOVED_CONFIGS = {f"demo_{n}.py": f"demo/{n}.py" for n in ("vae", "clip", "judge", "teacher")}
# keys that were renamed or removed: old dotted key -> its new names (the first that the config has is named)
RENAMED_KEYS = {
    "sample_every": ("evals.grids.every",), "sample_lcm_steps": ("evals.grids.steps",),
    "validation_prompts": ("evals.grids.prompts",),
    "learning_rate": ("optim.learning_rate",), "warmup_steps": ("optim.warmup_steps",),
    "weight_decay": ("optim.weight_decay",), "grad_clip": ("optim.grad_clip",),
    "judge": ("evals.reconstruction.judge", "evals.samples.judge"),
    "eval_prompts": ("evals.samples.prompts",), "eval_guidance": ("evals.samples.guidance",),
    "debug_kill_at_step": (),   # removed: tests kill the process from outside
}


def resolve_config_path(path: str) -> str:
    """``path`` (a config file, without ``:variant``) if it exists, else the shipped config it names."""
    if os.path.exists(path):
        return path
    rel = path.replace(os.sep, "/")
    rel = rel.split("configs/", 1)[1] if "configs/" in rel else os.path.basename(rel)
    if rel in MOVED_CONFIGS:
        raise InputError(f"the config {path!r} moved to configs/{MOVED_CONFIGS[rel]}; pass "
                         f"--config=configs/{MOVED_CONFIGS[rel]}")
    shipped = os.path.join(PACKAGE_CONFIGS, rel)
    if os.path.isfile(shipped):
        return shipped
    raise InputError(f"the config file {path!r} does not exist (neither here nor among the shipped configs in "
                     f"{PACKAGE_CONFIGS})")


def resolve_config_flag(argv: list[str]) -> list[str]:
    """``argv`` with the ``--config=FILE[:variant]`` value's FILE resolved by `resolve_config_path`."""
    out = []
    for arg in argv:
        if arg.startswith("--config="):
            path, sep, variant = arg[len("--config="):].partition(":")
            arg = f"--config={resolve_config_path(path)}{sep}{variant}"
        out.append(arg)
    return out


def load_config(arg: str) -> ml_collections.ConfigDict:
    """``get_config(variant)`` of a ``FILE[:variant]`` config argument (FILE resolved as above)."""
    path, _, variant = arg.partition(":")
    spec = importlib.util.spec_from_file_location("jaxlcd_config", resolve_config_path(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def flat_keys(cfg, prefix: str = "") -> list[str]:
    """Every dotted key of a ConfigDict, nested ones included."""
    keys = []
    for k, v in cfg.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys += flat_keys(v, f"{prefix}{k}.")
    return keys


def check_override_keys(argv: list[str]) -> None:
    """Raise ConfigKeyError (one sentence, with a suggestion) for a ``--config.KEY=...`` whose KEY does not exist
    in the config that ``--config`` names."""
    config_arg = next((a[len("--config="):] for a in argv if a.startswith("--config=")), None)
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if config_arg is None:
        return
    keys = set(flat_keys(load_config(config_arg)))   # also: a bad variant is one sentence here
    for key in overrides:
        if key in keys:
            continue
        if key in RENAMED_KEYS:
            new = next((k for k in RENAMED_KEYS[key] if k in keys), None)
            if new:
                raise ConfigKeyError(f"config key {key!r} was renamed to {new!r}: pass --config.{new}=...")
            if not RENAMED_KEYS[key]:
                raise ConfigKeyError(f"config key {key!r} was removed")
        close = difflib.get_close_matches(key, sorted(keys), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigKeyError(f"--config.{key}: the config {config_arg!r} has no key {key!r}{hint}")


def make_flags_parser(prog: str):
    """An absl ``app.run`` flags parser for ``prog``: configs found from any directory, a bad config file, variant,
    override key or value as one sentence (exit 2) instead of absl's traceback."""
    from absl import flags

    def parse(argv: list[str]) -> list[str]:
        try:
            argv = resolve_config_flag(argv)
            check_override_keys(argv)
            return flags.FLAGS(argv)
        except (JaxlcdError, flags.Error) as e:
            fail(prog, e)

    return parse


def fail(prog: str, error) -> None:
    """Print ``prog: error: <one sentence>`` to stderr and exit with status 2 at once: an orderly interpreter shutdown
    would wait for other processes of a multi-process run and print the tracebacks of orbax's abandoned writes."""
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    logging.shutdown()
    sys.stdout.flush()
    os._exit(2)


def stop_if_multi_process(prog: str) -> None:
    """In a multi-process run, print the current exception's traceback and one line naming this process, then end
    the process at once (``os._exit(1)``): JAX's orderly shutdown would wait for the other processes, which may be
    dead or blocked in a collective. One process: return (the caller re-raises)."""
    import traceback

    import jax

    if not jax.distributed.is_initialized() or jax.process_count() == 1:
        return
    traceback.print_exc()
    print(f"{prog}: error: process {jax.process_index()} of {jax.process_count()} stops on the error above; in a "
          "multi-process run that is usually another process that died or was killed (see its log)",
          file=sys.stderr, flush=True)
    os._exit(1)


def setup_logging() -> None:
    """jaxlcd's own log lines (INFO) with timestamps on stderr; absl (orbax, grain) only from WARNING."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/grain are chatty at INFO
    logging.getLogger("absl").addFilter(_one_line_orbax_errors)
    sys.unraisablehook = _ignore_closed_event_loops
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("jaxlcd")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _one_line_orbax_errors(record: logging.LogRecord) -> bool:
    """orbax logs each failed background write with its full traceback (hundreds of lines when a disk fills); jaxlcd
    reports the failure itself (WriteError), so orbax's records are cut to their first line."""
    if record.levelno >= logging.ERROR and "orbax" in record.pathname:
        record.msg, record.args = record.getMessage().splitlines()[0][:500], ()
        record.exc_info = record.exc_text = None
    return True


def _ignore_closed_event_loops(unraisable) -> None:
    """Drop the "Event loop is closed" errors tensorstore callbacks raise after orbax abandons a failed save (one
    per pending write); anything else goes to Python's default hook."""
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
        return
    sys.__unraisablehook__(unraisable)
