# The two commands a new user needs: `make demo` and `make test`. Both build .venv from scratch.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast test-launch test-docs test-parallel lint demo clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==26.3
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/pip check
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q

# Launchers for real (SLURM on localhost, torchrun multi-node, MPI, Dockerfile checks); root, ~10 min.
# Also the multi-process elastic-resume chain (4 -> 1 -> 4 ranks of `sgtm train`'s loop, ~3-5 min).
test-launch: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q -m launch tests/test_launch.py tests/test_resume.py

# Pipeline- and expert-parallel runs of 2-4 ranks (equivalence to one rank, isolation, resume).
test-parallel: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q -m parallel

# The README's and docs' command blocks marked runnable, as written, at tiny sizes (~2-5 min).
test-docs: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q -m docs tests/test_docs.py

lint: $(STAMP)
	$(BIN)/ruff check pipeline tools tests

demo: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/sgtm demo --out runs/demo

clean:
	rm -rf $(VENV) build *.egg-info
