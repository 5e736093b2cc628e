# medtl: two commands do all the set-up on a fresh machine.
#   make demo   -> venv + install (medtl and its web UI: .[ui]), sample data, fine-tune, predict, explain, then
#                  serve the web UI
#   make test   -> venv + install (everything the tests use: .[test], which pulls medtl[all]), then the test suite
# and for contributors: make lint (ruff + mypy), make docs (the MkDocs site, warnings as errors), make docker
# On a machine without an NVIDIA GPU, TORCH_INDEX=https://download.pytorch.org/whl/cpu installs PyTorch's
# CPU-only wheels first (no CUDA libraries: about 4 GiB less; docs/install.md)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SERVE  ?= 1
RUN    ?= runs/demo
TORCH_INDEX ?=
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-bf16 test-slow test-browser test-all fuzz lint docs docs-serve docker clean

# the venv with medtl installed (editable) with the extras $(1); PyTorch from $(TORCH_INDEX) first if set
define install
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install --quiet $(TORCH) --index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e '.[$(1)]'
endef

# the tests' set-up: every optional part (the test extra pulls medtl[all])
$(STAMP): pyproject.toml
	$(call install,test)
	touch $(STAMP)

# the demo's set-up: the core and the web UI
DEMO_STAMP := $(VENV)/.installed-demo
$(DEMO_STAMP): pyproject.toml
	$(call install,ui)
	touch $(DEMO_STAMP)

# the linters and the documentation tools, pinned in pyproject.toml's dev and docs extras
DEV_STAMP := $(VENV)/.installed-dev
$(DEV_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test,dev,docs]'
	touch $(DEV_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/medtl sample-data sample_data --force
	$(BIN)/medtl train --config configs/sample_ct.yaml --data sample_data/manifest.csv --out $(RUN) --force
	@# exit status 3: the model refused a file unlike its training images (a valid answer, printed with its reason)
	$(BIN)/medtl predict $(RUN) sample_data/dicom/img_0001.dcm sample_data/dicom/img_0003.dcm sample_data/nifti/vol_001.nii.gz \
		|| [ $$? -eq 3 ]
	$(BIN)/medtl explain $(RUN) sample_data/dicom/img_0003.dcm --out $(RUN)/example_gradcam.png --force || [ $$? -eq 3 ]
	@if [ "$(SERVE)" != "0" ]; then echo "Serving $(RUN) on http://127.0.0.1:7860 (Ctrl-C to stop)"; \
		$(BIN)/medtl serve $(RUN); fi

test: $(STAMP)
	$(BIN)/python -m pytest

# training and inference tests with bf16 forced (emulated where the CPU has no native bf16), so every
# machine covers the path that native-bf16 machines choose
test-bf16: $(STAMP)
	MEDTL_PRECISION=bf16 $(BIN)/python -m pytest tests/train tests/test_runtime.py tests/cli/test_cli.py tests/eval \
		tests/explain tests/pipelines tests/ui/test_app.py tests/predict/test_ood.py tests/predict/test_decision.py

# slow tests (torch.compile training: about a minute on 2 cores)
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# the end-to-end browser test (needs Debian's chromium: apt-get install chromium)
test-browser: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,browser]'
	$(BIN)/python -m pytest -m browser

# the readers' fuzz run over mutants of the real data (../shared/data or $$MEDTL_SHARED_DATA, plus generated
# seeds): fails on any untyped exception, timeout, killed reader or peak over the budget. The timeout is the
# readers' own processor-time limit (30 s): a study zip whose 1.5 GiB member is inflated within the budget takes
# 5-7 s alone, and more beside the other job; a read past 30 s of processor time is a typed refusal
FUZZ_N ?= 10000
fuzz: $(STAMP)
	$(BIN)/python -m tools.fuzz --n $(FUZZ_N) --seed 0 --jobs 2 --budget 2G --timeout 30 --out results/fuzz

# everything, including slow and browser tests
test-all: $(STAMP)
	$(BIN)/python -m pytest -m "" 

# ruff (lint + format check) over the code, mypy over the packages pyproject.toml lists
lint: $(DEV_STAMP)
	$(BIN)/ruff check medtl ui pipelines tools tests
	$(BIN)/ruff format --check medtl ui pipelines tools tests
	$(BIN)/mypy

# the documentation site (docs/ -> build/site), warnings as errors
docs: $(DEV_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site

docs-serve: $(DEV_STAMP)
	$(BIN)/mkdocs serve

# the CPU image (Dockerfile): linted by hadolint (pinned in the dev extra; Linux x86_64), then built and
# `medtl --help` run in it where a Docker daemon answers (the build fetches python:3.11-slim and PyTorch's CPU
# wheels)
docker: $(DEV_STAMP)
	@test -x $(BIN)/hadolint || { echo "hadolint: pip installs it on Linux x86_64 only (dev extra)" >&2; exit 1; }
	$(BIN)/hadolint Dockerfile
	@if docker info >/dev/null 2>&1; then \
		docker build --tag medtl:ci . && docker run --rm medtl:ci medtl --help >/dev/null \
		&& echo "docker: the image runs medtl --help"; \
	else echo "docker: no Docker daemon here: the Dockerfile was linted, not built"; fi

clean:
	rm -rf $(VENV) runs sample_data/dicom sample_data/nifti sample_data/manifest.csv
