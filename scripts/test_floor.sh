#!/usr/bin/env bash
# The declared transformers floor (pyproject.toml) checked: a second venv with exactly that release runs the
# tests that use transformers (families, runtimes, training data and steps, the CLI). Not part of `make test`
# (a second venv and ~5 more minutes); run it when the floor or the transformers-facing code changes.
set -euo pipefail
cd "$(dirname "$0")/.."
FLOOR=$(sed -n 's/^train = \["transformers>=\([0-9.]*\)".*/\1/p' pyproject.toml)
VENV=${FLOOR_VENV:-.venv-floor}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".[test]" "transformers==$FLOOR"
echo "transformers $("$VENV/bin/python" -c 'import transformers; print(transformers.__version__)') (floor $FLOOR)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_families.py tests/test_family_runtime.py \
  tests/test_train_data.py tests/test_runtime.py tests/test_roundtrip.py tests/test_train_step.py tests/test_cli.py "$@"
