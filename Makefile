# The two commands of the README. Each sets up .venv first (idempotent).
.PHONY: demo test setup bench test-floor

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/python -m mm_convert.demo

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider

bench: setup
	.venv/bin/python benchmarks/bench.py --shapes 3b --merge   # conversion vs cp -r + sync; results in benchmarks/results.md

test-floor:  # the transformers-facing tests on the declared floor release (a second venv, .venv-floor)
	@bash scripts/test_floor.sh
