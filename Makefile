# minisgm: `make book` renders the book, `make test` runs every test. Both create and fill
# the virtual environment .venv on first use (and again when requirements.txt changes).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install book test test-unit test-book clean

$(STAMP): requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build . -W --keep-going
	@echo "Open _build/html/index.html"

# Unit tests and strict nbval on every chapter, two workers, one notebook per worker.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile --nbval tests book $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest -n 2 tests $(PYTEST_ARGS)

clean:
	rm -rf _build .pytest_cache
