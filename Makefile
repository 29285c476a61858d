# Development entry points. `make test` is the README's test command and what CI runs.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# Release artifacts: `make wheel` / `make sdist` write here; `make wheel-test` makes its venv here.
DIST ?= dist
WHEEL_VENV ?= $(DIST)/venv
# The wheel builds in its own cargo directory (other flags than the editable build, so
# sharing target/release would only rebuild both in turn).
WHEEL_TARGET ?= target/wheel
# `python -m maturin` needs the maturin program in that interpreter's scripts folder; in a
# venv that borrows the system's site-packages, give the one on PATH: MATURIN=maturin.
MATURIN ?= $(PYTHON) -m maturin

.PHONY: install test rust-check py-check pytest wheel sdist wheel-test bench demo

install:  ## build the Rust extension (release) and install bca with every extra, editable
	$(PIP) install -e ".[all]"

rust-check:  ## format, lints and the pure-Rust tests (no Python needed)
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	cargo test --release

py-check:  ## lint, type-check the package, and the extension's stub against the built module
	$(PYTHON) -m ruff check python tests benches fuzz .ci
	$(PYTHON) -m mypy
	$(PYTHON) -m mypy.stubtest bca._bca

pytest:
	$(PYTHON) -m pytest

test: install rust-check py-check pytest  ## everything, from a fresh clone

# A wheel for every CPython >= 3.10 (abi3) on any x86-64 Linux with glibc >= 2.17
# (manylinux2014): zig (PyPI `ziglang`) links against glibc 2.17 symbols, so no
# manylinux container is needed. Release profile (fat LTO). RUSTFLAGS pins the baseline
# x86-64 CPU, whatever the environment or a cargo config asks for: the core picks its
# AVX2/FMA kernels at run time.
wheel:  ## abi3 manylinux2014 x86-64 wheel in dist/, checked (tags, contents, glibc symbols)
	$(PIP) install "maturin>=1.9.4,<2" "ziglang>=0.11" "auditwheel>=6"
	rm -f $(DIST)/bca-*.whl
	RUSTFLAGS="-C target-cpu=x86-64" CARGO_TARGET_DIR="$(WHEEL_TARGET)" $(MATURIN) \
		build --release --zig --compatibility manylinux2014 --interpreter $(PYTHON) \
		--out $(DIST)
	$(PYTHON) -m auditwheel show $(DIST)/bca-*.whl
	$(PYTHON) .ci/check_dist.py wheel $(DIST)/bca-*.whl

sdist:  ## source distribution in dist/ (builds with Rust and maturin on install), checked
	$(PIP) install "maturin>=1.9.4,<2"
	rm -f $(DIST)/bca-*.tar.gz
	$(MATURIN) sdist --out $(DIST)
	$(PYTHON) .ci/check_dist.py sdist $(DIST)/bca-*.tar.gz

# The Python tests against the installed wheel: a fresh venv that sees the interpreter's
# site-packages for the heavy extras (torch, transformers, ...; no second download), the
# wheel installed into it, and pytest run from the venv directory, where the checkout's
# python/ is not importable; BCA_EXPECT_INSTALLED_UNDER makes the run fail unless bca and
# its extension are imported from the venv.
wheel-test:  ## install dist/'s wheel into a fresh venv and run the Python tests against it
	rm -rf $(WHEEL_VENV)
	$(PYTHON) -m venv --system-site-packages $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install --quiet --no-deps --ignore-installed $(DIST)/bca-*.whl
	$(WHEEL_VENV)/bin/python -m pip install --quiet "$$(ls $(DIST)/bca-*.whl)[test]"
	venv="$$(cd $(WHEEL_VENV) && pwd)" && repo="$$(pwd)" && cd "$$venv" && \
		bin/python -c "import bca, bca._bca; print('wheel-test: bca from', bca.__file__)" && \
		PATH="$$venv/bin:$$PATH" BCA_EXPECT_INSTALLED_UNDER="$$venv" \
		bin/python -m pytest -p no:cacheprovider --rootdir "$$repo" -c "$$repo/pyproject.toml" "$$repo/tests"

bench:  ## core forward benchmark (writes benches/results/)
	$(PYTHON) benches/bench_core.py

demo:
	bca demo
