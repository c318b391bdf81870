# `make run` and `make test` do all set-up themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint typecheck bench dist dist-gpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/appliance serve

lint: setup
	$(BIN)/ruff check appliance tests bench packaging
	$(BIN)/ruff format --check appliance tests bench packaging

typecheck: setup
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

$(VENV)/.bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/inference.py

# The executable with its libraries beside it (dist/appliance/), one tarball of it, then a smoke
# test of the built binary (packaging/smoke.sh), again with no network but loopback.
DIST_TARBALL := dist/appliance-linux-$(shell uname -m).tar.gz

dist: setup
	$(BIN)/python -m pip install --quiet "pyinstaller>=6.10"
	$(BIN)/pyinstaller --noconfirm --clean --log-level WARN --distpath dist --workpath build/pyinstaller \
		packaging/appliance.spec
	bash packaging/link_duplicates.sh dist/appliance/_internal/llama_cpp/lib
	tar -C dist -czf $(DIST_TARBALL) appliance
	bash packaging/smoke.sh dist/appliance/appliance
	unshare -n sh -c 'ip link set lo up && bash packaging/smoke.sh dist/appliance/appliance'

# The CUDA build, from the same spec, by hand: llama.cpp's CUDA kernels take about 40 minutes per
# architecture to compile on 2 cores, too slow for CI. Its own venv keeps the CPU one as it is.
# CUDA_ARCHITECTURES is a CMake list; each one adds its compile time and its kernels' size.
# cuBLAS comes from NVIDIA's pip wheel (the toolkit here has none), 13.0 to match nvcc 13.0; the
# CUDA runtime and cuBLAS are shipped beside llama.cpp's libraries, whose RUNPATH is $$ORIGIN.
# GGML_CUDA_NO_VMM drops the link to the driver (libcuda), so the binary starts where there is
# none and serves on the CPU; the driver is loaded at run time where there is one.
GPU_VENV := .venv-gpu
GPU_BIN := $(GPU_VENV)/bin
CUDA_ARCHITECTURES ?= 90
CUDA_TOOLKIT := $(CURDIR)/build/cuda-toolkit
CUDA_CMAKE_ARGS := -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCHITECTURES) -DGGML_CUDA_NO_VMM=ON \
	-DGGML_NATIVE=OFF -DCUDAToolkit_ROOT=$(CUDA_TOOLKIT) -DCMAKE_CUDA_COMPILER=$(CUDA_TOOLKIT)/bin/nvcc
LLAMA_CPP_PYTHON := $(shell sed -n 's/^ *"\(llama-cpp-python==[^"]*\)".*/\1/p' pyproject.toml)
GPU_DIST_TARBALL := dist/appliance-linux-$(shell uname -m)-cuda.tar.gz

$(GPU_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_BIN)/python -m pip install --quiet --upgrade pip
	$(GPU_BIN)/python -m pip install --quiet "nvidia-cublas==13.0.*" "pyinstaller>=6.10"
	bash packaging/cuda_toolkit.sh $(GPU_VENV)/lib/python3*/site-packages/nvidia/cu13 $(CUDA_TOOLKIT)
	CMAKE_ARGS="$(CUDA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(GPU_BIN)/python -m pip install \
		--no-cache-dir --no-binary llama-cpp-python "$(LLAMA_CPP_PYTHON)"
	$(GPU_BIN)/python -m pip install --quiet -e .
	cp -L $(CUDA_TOOLKIT)/lib64/libcudart.so.13 $(CUDA_TOOLKIT)/lib64/libcublas.so.13 \
		$(CUDA_TOOLKIT)/lib64/libcublasLt.so.13 $(GPU_VENV)/lib/python3*/site-packages/llama_cpp/lib/
	touch $@

dist-gpu: setup $(GPU_VENV)/.installed
	$(GPU_BIN)/pyinstaller --noconfirm --clean --log-level WARN --distpath dist/cuda \
		--workpath build/pyinstaller-cuda packaging/appliance.spec
	bash packaging/link_duplicates.sh dist/cuda/appliance/_internal/llama_cpp/lib
	tar -C dist/cuda -czf $(GPU_DIST_TARBALL) appliance
	bash packaging/smoke.sh dist/cuda/appliance/appliance $(GPU_BIN)/appliance
	dist/cuda/appliance/appliance system

clean:
	rm -rf $(VENV) $(GPU_VENV) build dist *.egg-info
