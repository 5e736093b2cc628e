# medtl: two commands do all the set-up on a fresh machine.
#   make demo   -> venv + install, sample data, fine-tune, predict, explain, then serve the web UI
#   make test   -> venv + install, then the test suite
# and for contributors: make lint (ruff + mypy), make docs (the MkDocs site, warnings as errors)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SERVE  ?= 1
RUN    ?= runs/demo

.PHONY: demo test test-bf16 test-slow test-browser test-all fuzz lint docs docs-serve clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# the linters and the documentation tools, pinned in pyproject.toml's dev and docs extras
DEV_STAMP := $(VENV)/.installed-dev
$(DEV_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test,dev,docs]'
	touch $(DEV_STAMP)

demo: $(STAMP)
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

clean:
	rm -rf $(VENV) runs sample_data/dicom sample_data/nifti sample_data/manifest.csv
