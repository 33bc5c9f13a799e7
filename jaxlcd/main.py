"""Train an LCM student by (reward-guided) latent consistency distillation.

    python -m jaxlcd.main --config=configs/rglcd.py:tiny --workdir=/tmp/run [--config.key=value ...]
    python -m jaxlcd.main --config=configs/lrm_pretrain.py:tiny --workdir=/tmp/lrm   # LRM pretraining
    python -m jaxlcd.main --config=configs/demo_vae.py --workdir=/tmp/vae            # the demo world's VAE
    python -m jaxlcd.main --config=configs/demo_clip.py --workdir=/tmp/clip          # the demo world's CLIP
    (also configs/demo_judge.py, configs/demo_teacher.py; launch/train_demo_world.sh trains them all)

Rerunning the same command resumes from the newest checkpoint in the workdir.
"""
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/rglcd.py", "training config file[:variant]", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, logs, samples and exports", required=True)
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/grain are chatty at INFO
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("jaxlcd").addHandler(handler)
    logging.getLogger("jaxlcd").setLevel(logging.INFO)
    logging.getLogger("jaxlcd").propagate = False
    if FLAGS.config.get("xla_flags"):  # read when the XLA backend starts, i.e. at the first JAX computation below
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAGS.config.xla_flags}".strip()
    from jaxlcd.train import loop  # after flag parsing: keeps --help fast

    try:
        job = FLAGS.config.get("job", "rglcd")
        if job == "lrm_pretrain":
            from jaxlcd.train.lrm_pretrain import pretrain

            pretrain(FLAGS.config, FLAGS.workdir)
        elif job == "clip":
            from jaxlcd.train.clip_train import train_clip

            train_clip(FLAGS.config, FLAGS.workdir)
        elif job == "teacher":
            from jaxlcd.train.teacher_train import train_teacher

            train_teacher(FLAGS.config, FLAGS.workdir)
        elif job == "vae":
            from jaxlcd.train.vae_train import train_vae

            train_vae(FLAGS.config, FLAGS.workdir)
        elif job == "judge":
            from jaxlcd.train.judge_train import train_judge

            train_judge(FLAGS.config, FLAGS.workdir)
        elif FLAGS.config.get("demo") and (FLAGS.config.demo.baselines or FLAGS.config.demo.eval_prompts):
            from jaxlcd.demo import run_demo

            run_demo(FLAGS.config, FLAGS.workdir)
        else:
            loop.train(FLAGS.config, FLAGS.workdir)
    except (ValueError, loop.TrainingError) as e:  # config, pipeline, weights and data errors are ValueErrors
        print(f"jaxlcd.main: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
