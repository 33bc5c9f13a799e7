#!/usr/bin/env bash
# Retrain the demo world's shipped models from scratch (CPU; each step resumes when rerun) and copy them, as
# float16, into jaxlcd/assets/demo. Usage: launch/train_demo_world.sh [RUNS_DIR]   (default: runs/demo_world)
set -euo pipefail
RUNS=${1:-runs/demo_world}
main() { python -m jaxlcd.main "$@"; }
main --config=configs/demo_judge.py --workdir="$RUNS/judge"   # first: the VAE and teacher checks use it
# the VAE in three phases, each a fresh optimizer from the last one's vae/ folder (judge on reconstructions of held-out
# scenes, measured: 0.660 after phase 1, 0.750 after phase 2, 0.859 after phase 3 (shape 0.905, colour 1.0))
vae() { main --config=configs/demo_vae.py --config.judge="$RUNS/judge/judge" "$@"; }
vae --workdir="$RUNS/vae1"
vae --workdir="$RUNS/vae2" --config.init_from="$RUNS/vae1/vae" --config.edge_weight=1.0 --config.learning_rate=3e-4 \
    --config.warmup_steps=100 --config.total_steps=4000
vae --workdir="$RUNS/vae" --config.init_from="$RUNS/vae2/vae" --config.edge_weight=1.0 --config.learning_rate=3e-4 \
    --config.warmup_steps=100 --config.total_steps=6000
main --config=configs/demo_clip.py --workdir="$RUNS/clip"
main --config=configs/demo_clip.py:scorer --workdir="$RUNS/scorer"
main --config=configs/demo_teacher.py --workdir="$RUNS/teacher" --config.vae="$RUNS/vae/vae" \
    --config.clip="$RUNS/clip/clip" --config.judge="$RUNS/judge/judge"
main --config=configs/lrm_pretrain.py:demo --workdir="$RUNS/lrm" --config.teacher="$RUNS/teacher/teacher"
python - "$RUNS" <<'PY'
import sys
from jaxlcd.demo import ship_model
runs = sys.argv[1]
for name, src in [("teacher", "teacher/teacher"), ("clip", "clip/clip"), ("scorer", "scorer/clip"),
                  ("judge", "judge/judge"), ("lrm", "lrm/lrm")]:
    print("shipped", ship_model(f"{runs}/{src}", name))
PY
