# The two commands of the README. Each one creates .venv and installs everything it needs on a fresh machine.
#   make book   execute every chapter and build the HTML book (_build/html/index.html)
#   make test   every test: pytest units, nbval over all notebooks, export drift, book build with -W
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST := $(PY) -m pytest -q -p no:cacheprovider

.PHONY: book test install export clean-nbs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[book,test]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name python3 > /dev/null
	touch $(STAMP)

install: $(STAMP)

# Execute every chapter from scratch and build the HTML book with warnings as errors.
book: $(STAMP)
	$(VENV)/bin/jupyter-book build . --toc book/_toc.yml --path-output _build/book -W -n --keep-going
	@echo "book: _build/book/_build/html/index.html"

# Every test. nbval re-executes each notebook and compares its outputs with the committed ones.
test: $(STAMP)
	$(PYTEST) tests
	$(PYTEST) --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg notebooks

# Developer helpers: regenerate edm_lit/ from the notebooks; strip volatile notebook metadata.
export: $(STAMP)
	$(VENV)/bin/nbdev-export
clean-nbs: $(STAMP)
	$(PY) tools/nbclean.py

clean:
	rm -rf _build
