"""Train with jaxlcd: the job named by the config's ``job`` key.

    python -m jaxlcd.main --config=configs/rglcd.py --workdir=/tmp/run               # the demo world (default)
    python -m jaxlcd.main --config=configs/rglcd.py:tiny --workdir=/tmp/run [--config.key=value ...]
    python -m jaxlcd.main --config=configs/lrm_pretrain.py:tiny --workdir=/tmp/lrm  # LRM pretraining
    python -m jaxlcd.main --config=configs/demo/vae.py --workdir=/tmp/vae           # a demo-world model

Rerunning the same command resumes from the newest checkpoint in the workdir. Config files are found from any
directory (`jaxlcd.cli`).
"""
import importlib
import os

from absl import app, flags
from ml_collections import config_flags

from jaxlcd import cli
from jaxlcd.errors import InputError, JaxlcdError, describe_os_error

config_flags.DEFINE_config_file("config", cli.resolve_config_path("configs/rglcd.py"), "training config file[:variant]", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, logs, samples and exports", required=True)
FLAGS = flags.FLAGS
# config.job -> "module:function(cfg, workdir)"; a config may also name "package.module:function" itself
JOBS = {"distill": "jaxlcd.distill.job:train", "lrm_pretrain": "jaxlcd.rewards.lrm_pretrain:pretrain"}


def job_function(name: str):
    """The function a config's ``job`` names (a key of JOBS or "module:function"), imported now."""
    module, _, function = JOBS.get(name, name).partition(":")
    if not function:
        raise InputError(f"config.job={name!r} is unknown; use one of {', '.join(JOBS)} or 'package.module:function'")
    return getattr(importlib.import_module(module), function)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.setup_logging()
    if FLAGS.config.get("xla_flags"):  # read when the XLA backend starts, i.e. at the first JAX computation below
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAGS.config.xla_flags}".strip()
    try:
        job_function(FLAGS.config.get("job", "distill"))(FLAGS.config, FLAGS.workdir)
    except JaxlcdError as e:
        cli.fail("jaxlcd.main", e)
    except OSError as e:   # the workdir's disk or permissions (a bug shows as another exception type)
        cli.fail("jaxlcd.main", describe_os_error(e))
    except Exception:
        cli.stop_if_multi_process("jaxlcd.main")   # ends this process at once when others are involved
        raise


if __name__ == "__main__":
    app.run(main, flags_parser=cli.make_flags_parser("jaxlcd.main"))
