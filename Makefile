# Development entry points. `make test` is the README's test command and what CI runs.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install test rust-check py-check pytest bench demo

install:  ## build the Rust extension (release) and install bca with every extra, editable
	$(PIP) install -e ".[all]"

rust-check:  ## format, lints and the pure-Rust tests (no Python needed)
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	cargo test --release

py-check:  ## lint, type-check the package, and the extension's stub against the built module
	$(PYTHON) -m ruff check python tests benches fuzz
	$(PYTHON) -m mypy
	$(PYTHON) -m mypy.stubtest bca._bca

pytest:
	$(PYTHON) -m pytest

test: install rust-check py-check pytest  ## everything, from a fresh clone

bench:  ## core forward benchmark (writes benches/results/)
	$(PYTHON) benches/bench_core.py

demo:
	bca demo
