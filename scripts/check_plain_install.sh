#!/usr/bin/env bash
# A plain `pip install .` (no extras) into a fresh virtual environment, then the README's first commands:
# `mmeff list` must run; `mmeff bench --per-kind 1` must run or stop with the one line naming the extra to
# install (issue 37 item 7). Usage: scripts/check_plain_install.sh [venv folder]  (the folder is recreated)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-/tmp/mmeff-plain-venv}"
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check .
# (triton is not checked: torch's Linux wheels depend on it themselves)
"$VENV/bin/pip" list --disable-pip-version-check 2>/dev/null | grep -i -E "^(scikit|matplotlib|lpips|gguf|gradio) " \
  && { echo "an extra's package came with the plain install" >&2; exit 1; } || true
cd "$VENV"  # not the checkout: the installed package must be what runs
export MMEFF_CACHE="$VENV/cache"
"$VENV/bin/mmeff" list > list.txt
echo "mmeff list: $(wc -l < list.txt) lines"
set +e
"$VENV/bin/mmeff" bench --per-kind 1 > bench.out 2> bench.err
rc=$?
set -e
echo "mmeff bench --per-kind 1: rc $rc"
tail -n 1 bench.err
if [[ $rc -ne 0 ]] && ! tail -n 1 bench.err | grep -q "pip install 'mmeff\["; then
  echo "the bench failed without naming an extra" >&2; exit 1
fi
