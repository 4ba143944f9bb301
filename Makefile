# Everything runs in a local virtual environment (.venv); each target does its own setup and is
# safe to run again. Quick start: `make demo` (main job), `make test` (test suite).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.repmlp
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Python packages the build, the tests and the demo need (torch pinned: other specs download CUDA wheels).
PY_DEPS := torch==2.13.0 numpy pybind11 cmake ninja pytest pillow scikit-learn onnx onnxscript onnxruntime matplotlib
# The benchmark's peers (ONNX Runtime is also a test dependency: tests/test_onnx_export.py).
BENCH_DEPS := openvino
# Debian header packages the C++ runtime builds against.
DEB_DEPS := libstb-dev libcli11-dev nlohmann-json3-dev zlib1g-dev libssl-dev

ARTIFACT := repmlp-digits.pt

.PHONY: all setup install serve-deps triton-server mmcls-oracle demo test test-fast test-avx2 test-torch-latest bench ctest clean fuzz

all: demo

$(STAMP)/system:
	@mkdir -p $(STAMP)
	@missing=$$(for p in $(DEB_DEPS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $$missing; \
	fi
	@touch $@

$(STAMP)/python: | $(STAMP)/system
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(PY_DEPS)
	@touch $@

setup: $(STAMP)/system $(STAMP)/python

# The optional `serve` extra (Ray Serve / Ray Data, Triton client), pinned in
# requirements-serve.txt; reinstalled only when that file changes. The tests need it.
$(STAMP)/serve: requirements-serve.txt | $(STAMP)/python
	$(PIP) install -q -r requirements-serve.txt
	$(PIP) check
	@touch $@

serve-deps: $(STAMP)/serve

# A Triton Inference Server for the Triton tests and the load benchmark, in .triton/ beside
# .venv and never in it: the nvidia-pytriton wheel, for its tritonserver binary and Python
# backend only (not its Python package, whose requirements include numpy<2), the backend stub
# for .venv's Python version, and numpy 1.x for that stub (it is built against numpy 1.x;
# repmlp-triton-repo --python-path puts .triton/numpy1 first on the stub's sys.path). The stub
# links the system's libpython of that version.
TRITON_DIR    := .triton
TRITON_WHEEL  := nvidia-pytriton==0.7.0
TRITON_NUMPY  := numpy==1.26.4
TRITON_SERVER := $(TRITON_DIR)/server/pytriton/tritonserver

$(TRITON_DIR)/.installed: | $(STAMP)/python
	rm -rf $(TRITON_DIR)
	$(PIP) install -q --no-deps --target $(TRITON_DIR)/server $(TRITON_WHEEL)
	$(PIP) install -q --no-deps --target $(TRITON_DIR)/numpy1 $(TRITON_NUMPY)
	@pyver=$$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	cp $(TRITON_SERVER)/python_backend_stubs/$$pyver/triton_python_backend_stub $(TRITON_SERVER)/backends/python/; \
	ldconfig -p | grep -q "libpython$$pyver.so.1.0" || { echo "installing Debian package: libpython$$pyver"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q libpython$$pyver; }
	@touch $@

triton-server: $(TRITON_DIR)/.installed

# mmcls 0.25.0, the tests' independent oracle (tests/test_mmcls_oracle.py), in a venv of its own:
# mmcv 1.7.2 built without its C++ ops (its setup.py needs pkg_resources, so setuptools<81), no
# torchvision (tests/mmcls_oracle/stub stands in). About 2 minutes the first time.
MMCLS_VENV := .venv-mmcls
MMCLS_PY   := $(MMCLS_VENV)/bin/python
MMCLS_DEPS := torch==2.13.0 numpy==2.4.6 setuptools==80.10.2 addict==2.4.0 yapf==0.43.0 pyyaml==6.0.4 \
              opencv-python-headless==5.1.0.95 matplotlib==3.11.2

$(MMCLS_VENV)/.installed:
	@[ -x $(MMCLS_PY) ] || $(PYTHON) -m venv $(MMCLS_VENV)
	$(MMCLS_PY) -m pip install -q $(MMCLS_DEPS)
	MMCV_WITH_OPS=0 $(MMCLS_PY) -m pip install -q --no-build-isolation --no-deps mmcv==1.7.2
	$(MMCLS_PY) -m pip install -q --no-deps mmcls==0.25.0
	@touch $@

mmcls-oracle: $(MMCLS_VENV)/.installed

# Rebuilds incrementally (CMake build folder under build/); cheap when nothing changed.
install: setup
	@echo "building the C++ runtime, repmlp_infer and the binding (first time: a few minutes; pip -q hides CMake's output)"
	$(PIP) install -q --no-build-isolation -e .

# Main job: build the artifact from the embedded digits checkpoint, run the C++ binary on the
# shipped PNG digits and print each prediction next to the truth.
demo: install
	$(VENV)/bin/repmlp-build --out $(ARTIFACT) --force
	$(VENV)/bin/repmlp_infer --info $(ARTIFACT) | head -n 5
	PATH=$(abspath $(VENV)/bin):$$PATH $(PY) examples/digits/demo.py $(ARTIFACT) examples/digits/images

test: install serve-deps triton-server mmcls-oracle
	PATH=$(abspath $(VENV)/bin):$$PATH $(PY) -m pytest

test-fast: install serve-deps triton-server mmcls-oracle
	PATH=$(abspath $(VENV)/bin):$$PATH $(PY) -m pytest -m "not slow"

# The suite with torch's kernel libraries (ATen, oneDNN, MKL) capped at AVX2: the code paths of
# a CPU without AVX-512 or VNNI (int8 sums, last-bit differences between kernels), on any x86 host.
AVX2_ONLY := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2

test-avx2: install serve-deps triton-server mmcls-oracle
	$(AVX2_ONLY) PATH=$(abspath $(VENV)/bin):$$PATH $(PY) -m pytest

# Seeded fuzzing of artifacts (.pt and .pt2), checkpoints, .npy, PNG and JPEG through repmlp_infer, repmlp_rt
# and the builder: 1,000 cases, counts by outcome; exit 1 on any crash, hang, unclean error or
# wrong answer (FUZZ_ARGS="--cases 5000 --seed 7" for more).
fuzz: install
	PATH=$(abspath $(VENV)/bin):$$PATH $(PY) tests/fuzz.py $(FUZZ_ARGS)

# The newest torch release in a second environment (.venv-torch-latest, CMake build folder
# build/cmake-torch-latest): builds everything against it and runs the whole suite. PyPI's
# torch wheel pulls in ~2.8 GB of CUDA libraries, so this is not part of .ci/run. Where pip's
# configuration caps torch below it (/etc/xdg/pip/constraints.txt), PIP_CONSTRAINT=/dev/null
# lifts the cap for these two commands only.
TORCH_LATEST ?= 2.15.0
LATEST_VENV  := .venv-torch-latest
LATEST_PY    := $(LATEST_VENV)/bin/python
LATEST_BUILD := build/cmake-torch-latest

test-torch-latest: $(STAMP)/system mmcls-oracle
	@[ -x $(LATEST_PY) ] || $(PYTHON) -m venv $(LATEST_VENV)
	PIP_CONSTRAINT=/dev/null $(LATEST_PY) -m pip install -q torch==$(TORCH_LATEST) $(filter-out torch==%,$(PY_DEPS))
	PIP_CONSTRAINT=/dev/null $(LATEST_PY) -m pip install -q -r requirements-serve.txt
	REPMLP_CMAKE_BUILD_DIR=$(LATEST_BUILD) PIP_CONSTRAINT=/dev/null $(LATEST_PY) -m pip install -q --no-build-isolation .
	REPMLP_CMAKE_BUILD_DIR=$(LATEST_BUILD) PATH=$(abspath $(LATEST_VENV)/bin):$$PATH $(LATEST_PY) -m pytest

bench: install
	$(PIP) install -q $(BENCH_DEPS)
	$(PY) -m benchmarks.bench $(BENCH_ARGS)

clean:
	rm -rf build $(TRITON_DIR) python/*.egg-info python/repmlp_rt/_runtime*.so $(VENV)/bin/repmlp_infer $(ARTIFACT)

# Optional C++ unit tests (gtest via ctest) against a freshly built digits artifact.
$(STAMP)/gtest: | $(STAMP)/system
	@dpkg -s libgtest-dev >/dev/null 2>&1 || { echo "installing Debian package: libgtest-dev"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q libgtest-dev; }
	@touch $@

ctest: install $(STAMP)/gtest
	$(VENV)/bin/repmlp-build --out build/ctest-digits.pt --force
	$(VENV)/bin/cmake -S . -B build/ctest -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) \
	  -DPython3_EXECUTABLE=$(abspath $(PY)) -DREPMLP_BUILD_TESTS=ON \
	  -DREPMLP_TEST_ARTIFACT=$(abspath build/ctest-digits.pt)
	$(VENV)/bin/cmake --build build/ctest -j2
	$(VENV)/bin/ctest --test-dir build/ctest --output-on-failure
