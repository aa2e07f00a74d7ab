# tumorseg: `make run` builds everything, `make test` runs the suite. Both create .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
# Prefect's local ephemeral server and settings stay inside the project.
export PREFECT_HOME ?= $(abspath .prefect)
export PREFECT_SERVER_ALLOW_EPHEMERAL_MODE ?= true
export MPLBACKEND ?= Agg

.PHONY: venv run test test-fast reliability bench bench-dicom lint format clean

venv: $(VENV)/.installed

# torch first, pinned: an unpinned torch (also pulled by lightning/monai) downloads GBs of CUDA.
# Everything else through constraints.txt, the tested set. setuptools notes on every editable install
# of two top-level packages (src/tumorseg and pipelines) that folders named like them may shadow them;
# the note is not shown (PYTHONWARNINGS on the editable installs). pip byte-compiles what it installs
# one file at a time; compileall does it on every core instead (the same .pyc files; a few dependency
# files written for newer Pythons fail to compile, which pip skips silently too, hence -qq and || true).
# The project's own modules too: an editable install leaves them to the first import, which never
# writes them where PYTHONDONTWRITEBYTECODE is set (containers, CI), and every `tumorseg` command would
# compile them again (0.2 s of a cold `tumorseg predict` on a 2-core AVX2 CPU).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile --upgrade "pip>=24" setuptools wheel
	$(BIN)/python -m pip install -q --no-compile torch==2.13.0 -c constraints.txt
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install -q --no-compile -c constraints.txt -e ".[dev]"
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib src pipelines || true
	touch $@

# The tests also run nnU-Net's own dataset check on `tumorseg export`. nnunetv2 2.5.2 pulls unittest2,
# which pulls PyPI's `argparse` 1.4.0, a Python 2 era copy that shadows the standard library's in
# subprocesses (Prefect's server): it is removed again (unittest2 works with the standard one).
$(VENV)/.test-installed: $(VENV)/.installed
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install -q --no-compile -c constraints.txt -e ".[dev,interop]"
	$(BIN)/python -m pip uninstall -q -y argparse
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	touch $@

# The 3-D champion first (data stages, train, evaluate, promote), then everything else.
run: venv
	$(BIN)/python -m compileall -qq -j 0 src pipelines || true  # sources changed since the install
	$(BIN)/dvc repro promote@3d
	$(BIN)/dvc repro

test: venv $(VENV)/.test-installed
	$(BIN)/python -m pytest -q

test-fast: venv $(VENV)/.test-installed
	$(BIN)/python -m pytest -q -m "not slow"

# The README's reliability tables: the whole suite, recording the crash-consistency harness's kill
# points and every distinct one-line error (bad input) per command: reports/reliability.{json,md}.
reliability: venv $(VENV)/.test-installed
	$(BIN)/python -m pytest -q --reliability-out=reports/reliability.json

# Benchmarks need the trained champion: `dvc repro` first (a no-op when up to date).
bench: run
	$(BIN)/python -m benchmarks --out benchmarks/results.json

# The DICOM path's choices (docs/dicom.md, decision 0022): SimpleITK against ITK-elastix on the
# generated studies, and the brain-extraction network against the MNI152 mask on non-template brains.
# ITK-elastix gets its own environment, .venv-elastix (itk-elastix and numpy, pinned in
# constraints.txt: ITK's wheels take 1.6 GB), run as a subprocess.
ELASTIX_VENV ?= .venv-elastix
$(ELASTIX_VENV)/.installed: constraints.txt
	test -x $(ELASTIX_VENV)/bin/python || $(PYTHON) -m venv $(ELASTIX_VENV)
	$(ELASTIX_VENV)/bin/python -m pip install -q -c constraints.txt itk-elastix numpy
	touch $@

bench-dicom: venv $(ELASTIX_VENV)/.installed
	$(BIN)/dvc repro dicom_studies brain
	$(BIN)/python -m benchmarks.registration --elastix-python $(ELASTIX_VENV)/bin/python --out benchmarks/registration.json
	$(BIN)/python -m benchmarks.brain_extraction --cases 4 --out benchmarks/brain_extraction.json

lint: venv
	$(BIN)/ruff check src tests pipelines benchmarks
	$(BIN)/ruff format --check src tests pipelines benchmarks

format: venv
	$(BIN)/ruff format src tests pipelines benchmarks
	$(BIN)/ruff check --fix src tests pipelines benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
