# fundus-dr-tutorials — every target creates .venv and installs the project when it is
# missing or when pyproject.toml or the lock file changed, so each one works as the first command
# on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The course's lock file: every package pinned with its hashes (`make lock` regenerates it).
LOCK   := requirements/course.lock
## TORCH_INDEX: opt-in PyTorch wheel index for `make install` on a fresh clone (or after `make clean`),
## e.g. `make install TORCH_INDEX=https://download.pytorch.org/whl/cpu` for the CPU-only build on a
## laptop. Empty (the default): everything, PyTorch included, comes from the lock file (PyPI).
TORCH_INDEX ?=
# Lock entries that only PyTorch's own wheels need: with TORCH_INDEX they are skipped and torch and
# torchvision (same versions as the lock) come from that index without their CUDA libraries.
TORCH_ONLY := ^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)[ =;]
# PyTorch's OpenMP threads spin-wait by default; on a busy 2-core machine that made training 5x
# slower (benchmarks noted in the README). Passive waiting costs nothing on a quiet machine.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: run test test-unit test-notebooks lab notebooks bench clean install lock

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
ifeq ($(TORCH_INDEX),)
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
else
	awk '/^[^ #]/ {skip = ($$0 ~ /$(TORCH_ONLY)/)} !skip' $(LOCK) > $(VENV)/lock-without-torch.txt
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(VENV)/lock-without-torch.txt
	$(BIN)/python -m pip install --quiet --no-deps --index-url $(TORCH_INDEX) \
	    $$(grep -oE '^torch(vision)?==[^ ]+' $(LOCK))
endif
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (fundus)" >/dev/null
	touch $(STAMP)

## lock: re-pin every dependency (with hashes) into requirements/course.lock, for every platform and
## Python >= 3.11; the PyTorch pair stays the one in requirements/torch-pair.txt. Needs PyPI.
UV_VERSION := 0.13.9
TOOLS      := .tools
lock:
	test -x $(TOOLS)/bin/uv || { $(PYTHON) -m venv $(TOOLS) && $(TOOLS)/bin/python -m pip install --quiet uv==$(UV_VERSION); }
	$(TOOLS)/bin/uv pip compile pyproject.toml --extra notebooks --extra dev --universal \
	    --python-version 3.11 --generate-hashes --constraint requirements/torch-pair.txt \
	    --custom-compile-command "make lock" --quiet --output-file $(LOCK)

## run: execute every notebook in profile PROFILE (default quick; PROFILE=gpu on a GPU also writes
## results/<notebook>/gpu.json) into runs/<timestamp>/ and write summary.md
PROFILE ?= quick
run: $(STAMP)
	$(BIN)/python -m fundus_lib.runner --profile $(PROFILE)

## test: unit tests, then every notebook executed in the smoke profile (papermill + nbval)
test: $(STAMP)
	TQDM_DISABLE=1 $(BIN)/python -m pytest tests

test-unit: $(STAMP)
	TQDM_DISABLE=1 $(BIN)/python -m pytest tests/unit

test-notebooks: $(STAMP)
	TQDM_DISABLE=1 $(BIN)/python -m pytest tests/notebooks

## lab: open JupyterLab on the notebooks
lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

## notebooks: re-execute the committed notebooks in place (quick profile) so their outputs are current
## (progress bars off: committed outputs carry no widget state for them)
notebooks: $(STAMP)
	TQDM_DISABLE=1 $(BIN)/python -m fundus_lib.runner --profile quick --in-place

## bench: speed figures, one per line
bench: $(STAMP)
	@for script in benchmarks/*.py; do echo "== $$script"; TQDM_DISABLE=1 $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) $(TOOLS) runs/ .pytest_cache data/generated
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
