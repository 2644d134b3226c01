# fundus-dr-tutorials — every target creates .venv and installs the project when it is
# missing or when pyproject.toml changed, so each one works as the first command on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# PyTorch's OpenMP threads spin-wait by default; on a busy 2-core machine that made training 5x
# slower (benchmarks noted in the README). Passive waiting costs nothing on a quiet machine.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: run test test-unit test-notebooks lab notebooks bench clean install

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[notebooks,dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (fundus)" >/dev/null
	touch $(STAMP)

## run: execute every notebook in the quick profile into runs/<timestamp>/ and write summary.md
run: $(STAMP)
	$(BIN)/python -m fundus_lib.runner --profile quick

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
	rm -rf $(VENV) runs/ .pytest_cache data/generated
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
