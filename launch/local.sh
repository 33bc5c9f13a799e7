#!/usr/bin/env bash
# One CPU or one accelerator host: the tiny variant by default (seconds), any variant with VARIANT=...
#   launch/local.sh WORKDIR [--config.key=value ...]
set -euo pipefail
WORKDIR=${1:?usage: $0 WORKDIR [--config.key=value ...]}; shift
cd "$(dirname "$0")/.."
exec python -m jaxlcd.main --config="configs/rglcd.py:${VARIANT:-tiny}" --workdir="$WORKDIR" "$@"
