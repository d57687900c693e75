# Serval: the two entry points are `make demo` and `make test`.
# Everything they need is set up here: no global installs by hand.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
CARGO ?= cargo
# Build the SDK extension against the venv's interpreter, not a shim.
export PYO3_PYTHON := $(abspath $(VPY))

.PHONY: all build venv sdk demo test test-rust test-python test-tensorflow clean netns-deps browser-deps

all: build sdk

PY_DEPS := "maturin>=1.16,<2" "starlette>=0.40" "cloudpickle>=3" python-multipart pyyaml pathspec pytest requests uvicorn pillow numpy onnxruntime scikit-learn skl2onnx grpcio grpcio-tools grpcio-reflection grpcio-health-checking hypothesis boto3 fastapi "pydantic>=2" websockets kubernetes-validate mypy

# Debian's python3 needs python3-venv for `-m venv`; install it if missing.
$(VPY):
	@$(PYTHON) -m venv --help >/dev/null 2>&1 && $(PYTHON) -c 'import ensurepip' 2>/dev/null || \
		(command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq python3-venv) )
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

# Re-run when the dependency list in this Makefile changes.
$(VENV)/.deps: Makefile | $(VPY)
	$(VPY) -m pip install -q $(PY_DEPS)
	touch $@

venv: $(VENV)/.deps

# The `serval` package (SDK, replica host and the `serve` console script).
sdk: $(VENV)/.deps
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH \
		$(VENV)/bin/maturin develop -q -m python-sdk/Cargo.toml

build:
	$(CARGO) build -p serval-head

demo: sdk
	SERVAL_PYTHON=$(abspath $(VPY)) $(VPY) examples/quickstart.py

# Clippy first: the workspace lints (Cargo.toml, clippy.toml) and every
# warning fail the tests.
test-rust: sdk build netns-deps
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) test --workspace --exclude serval-python

# tests/tests/cluster/multihost.rs runs hosts in network namespaces (`ip netns`,
# `tc`): as root, install iproute2 with apt if missing. Without root those
# tests skip and say why.
netns-deps:
	@[ "$$(id -u)" != 0 ] || command -v ip >/dev/null || \
		(command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq iproute2) || true

# python-sdk/tests/test_dashboard.py drives a headless Chromium (Debian's
# chromium and chromium-driver): as root, install them with apt if missing.
browser-deps:
	@[ "$$(id -u)" != 0 ] || command -v chromium >/dev/null || \
		(command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq chromium chromium-driver) || true

# stubtest: python-sdk/python/serval/_native.pyi against the built module.
test-python: sdk browser-deps
	$(VPY) -m mypy.stubtest serval._native
	$(VPY) -m pytest -q python-sdk/tests

test: test-rust test-python

# handler.type: tensorflow (python-sdk/tests_tensorflow) in its own venv, so
# that `make test` never installs TensorFlow (hundreds of MB).
TF_VENV := .venv-tf
TF_VPY := $(TF_VENV)/bin/python

$(TF_VPY):
	$(PYTHON) -m venv $(TF_VENV)
	$(TF_VPY) -m pip install -q --upgrade pip

$(TF_VENV)/.deps: Makefile | $(TF_VPY)
	$(TF_VPY) -m pip install -q $(PY_DEPS) tensorflow-cpu
	touch $@

test-tensorflow: $(TF_VENV)/.deps
	VIRTUAL_ENV=$(abspath $(TF_VENV)) PATH=$(abspath $(TF_VENV))/bin:$$PATH PYO3_PYTHON=$(abspath $(TF_VPY)) \
		$(TF_VENV)/bin/maturin develop -q -m python-sdk/Cargo.toml
	$(TF_VPY) -m pytest -q python-sdk/tests_tensorflow

clean:
	rm -rf target $(VENV) $(TF_VENV) .serval

# Serval vs Ray Serve on this machine (release build, throw-away venvs under
# bench/, wrk); writes BENCHMARKS.md. See bench/run.
.PHONY: bench
bench:
	bench/run
