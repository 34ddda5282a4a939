#!/usr/bin/env bash
# Builds the bring-along for a bare GPU machine (see benchmarks/gpu_pack.py): gpu_pack.sh [DIR] (default .gpu-pack).
set -euo pipefail
exec python3 "$(dirname "$0")/gpu_pack.py" "$@"
