#!/usr/bin/env bash
# The lmms-eval wrapper's test (tests/eval/test_lmms_eval.py, skipped where lmms-eval is missing) in a virtual
# environment that sees this machine's packages plus lmms-eval 0.7.3 and the runtime packages its import and
# evaluator need. lmms-eval's own requirements would replace torch/av/transformers (it pins av<16), so each
# package goes in with --no-deps; filelock stays below 4 (lmms-eval 0.7.3 imports filelock._api, gone in 4.x).
# Usage: scripts/test_lmms_eval.sh [venv folder]   (needs mmeff installed, e.g. by scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-/tmp/mmeff-lmms-venv}"
[[ -x "$VENV/bin/python" ]] || python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps lmms-eval==0.7.3 filelock==3.32.7 \
  aiohappyeyeballs==2.7.1 aiohttp==3.14.5 aiosignal==1.4.0 chardet==7.7.0 dataproperty==1.1.1 datasets==5.2.0 \
  dill==0.4.1 evaluate==0.4.6 frozenlist==1.8.0 jsonlines==4.0.0 loguru==0.8.0 lxml==6.2.1 mbstrdecoder==1.1.5 \
  multidict==7.2.1 multiprocess==0.70.19 numexpr==2.14.2 pathvalidate==3.3.1 portalocker==4.4.2 propcache==0.5.4 \
  pytablewriter==1.2.1 sacrebleu==2.6.0 sqlitedict==2.1.0 tabledata==1.3.5 tabulate==0.10.0 tcolorpy==0.1.7 \
  tenacity==9.2.1 typepy==2.0.0 xxhash==4.1.0 yarl==1.25.1
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/eval/test_lmms_eval.py
