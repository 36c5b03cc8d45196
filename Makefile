# The README's commands. Each sets itself up first (scripts/setup.sh).
.PHONY: setup demo test bench
setup:
	bash scripts/setup.sh
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
bench: setup
	.venv/bin/python benchmarks/bench_inference.py
	.venv/bin/python benchmarks/bench_accuracy.py
