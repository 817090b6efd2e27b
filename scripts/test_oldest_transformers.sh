#!/usr/bin/env bash
# The tests that touch transformers' moving parts (the KV-cache keyword, masks, model outputs, config classes)
# once more on the OLDEST transformers mmeff supports, pyproject's lower bound; the main suite runs on the
# newest release the pin allows. The old version goes into .cache/ (PYTHONPATH puts it first), not over the
# installed one; its dependencies (huggingface-hub, tokenizers) are those the newest one brought.
set -euo pipefail
cd "$(dirname "$0")/.."
OLDEST="5.20.2"
DIR=".cache/transformers-$OLDEST"
if [[ ! -f "$DIR/transformers/__init__.py" ]]; then
  python3 -m pip install -q --disable-pip-version-check --no-deps --target "$DIR" "transformers==$OLDEST"
fi
export PYTHONPATH="$PWD/$DIR${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import transformers as t, sys; v = t.__version__; print('oldest transformers:', v); sys.exit(v != '$OLDEST')"
pytest -q -p no:cacheprovider tests/core/test_hfconfig.py tests/kv tests/adapters/test_hf_adapters.py tests/adapters/test_gemma3_adapter.py tests/adapters/test_llava_next_adapter.py tests/adapters/test_idefics3_adapter.py tests/adapters/test_internvl_adapter.py tests/adapters/test_qwen3_vl_adapter.py \
  tests/models/test_eve.py tests/eval/test_profile.py tests/eval/test_host_costs.py tests/quant/test_hf_quantizer.py
