# The two commands of the README. Each one creates .venv and installs exactly the tested versions (constraints.txt).
#   make book   execute every chapter from scratch and build the HTML book (_build/book/_build/html/index.html)
#   make test   every test: pytest units, export drift, the book build with -W, nbval over all notebooks
# Developer helpers: make lock (refresh constraints.txt), make export, make clean-nbs, make clean.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := constraints.txt
PYTEST := $(PY) -m pytest -q -p no:cacheprovider

.PHONY: book test install lock clean-venv export clean-nbs clean

$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) tools/check_lock_python.py $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip -c $(LOCK)
	$(PY) -m pip install -q -c $(LOCK) -e ".[book,test]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name python3 > /dev/null
	touch $(STAMP)

install: $(STAMP)

# Execute every chapter from scratch (--all: every page is re-read, so every notebook is re-executed, even when
# nothing changed since the last build) and build the HTML book with warnings as errors. A cell that runs longer
# than execute.timeout in _config.yml fails the build with the notebook's name and the cell's source.
book: $(STAMP)
	$(VENV)/bin/jupyter-book build . --all --toc book/_toc.yml --path-output _build/book -W -n --keep-going
	$(VENV)/bin/python tools/check_html.py _build/book/_build/html
	@echo "book: _build/book/_build/html/index.html"

# Every test. nbval re-executes each notebook and compares its outputs with the committed ones; like the book
# build, it gives each cell at most 300 s, so a hung kernel fails the run instead of stalling it.
test: $(STAMP)
	$(PYTEST) tests
	$(PYTEST) --nbval --nbval-current-env --nbval-cell-timeout=300 --nbval-sanitize-with tests/nbval_sanitize.cfg \
		notebooks

# Refresh the lock: install the newest versions pyproject.toml allows into a scratch venv, run nothing, and write
# their exact versions to constraints.txt. Then run `make clean-venv book test` before committing the new lock.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q -e ".[book,test]"
	{ echo "# The exact versions the book and the tests were run with (pip install -c $(LOCK)); refresh: make lock."; \
	  echo "# Python $$(.venv-lock/bin/python -c 'import platform; print(platform.python_version())'), $$(uname -m)."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable --all | grep -v '^edm-lit' | LC_ALL=C sort -f; } > $(LOCK)
	rm -rf .venv-lock
	@echo "wrote $(LOCK)"

clean-venv:
	rm -rf $(VENV)

# Developer helpers: regenerate edm_lit/ from the notebooks; strip volatile notebook metadata.
export: $(STAMP)
	$(VENV)/bin/nbdev-export
clean-nbs: $(STAMP)
	$(PY) tools/nbclean.py

clean:
	rm -rf _build
