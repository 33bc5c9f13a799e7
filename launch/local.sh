#!/usr/bin/env bash
# One CPU or one accelerator host: the demo job by default (as `python -m jaxlcd.main`), any variant with VARIANT=...
#   (VARIANT=tiny: random tiny models, seconds)
#   launch/local.sh WORKDIR [--config.key=value ...]
set -euo pipefail
WORKDIR=${1:?usage: $0 WORKDIR [--config.key=value ...]}; shift
cd "$(dirname "$0")/.."
exec python -m jaxlcd.main --config="configs/rglcd.py:${VARIANT:-demo}" --workdir="$WORKDIR" "$@"
