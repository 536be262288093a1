# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
# `make docs` builds the documentation site into site/.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Exact versions for development and CI; pyproject.toml declares ranges.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed
# The second lane: the oldest torch tested in CI, without torchvision (none is built for it here).
# (torch 2.11, the oldest declared, has no lane: README "Tested versions".)
VENV213  := .venv213
PY213    := $(VENV213)/bin/python
TORCH213 := torch==2.13.0
STAMP213 := $(VENV213)/.installed

.PHONY: demo test test-fast test-torch213 lint docs check clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_PINS)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,dev,examples,vision,docs]' $(TORCH_PINS)
	touch $(STAMP)

$(STAMP213): pyproject.toml Makefile
	test -x $(PY213) || $(PYTHON) -m venv $(VENV213)
	$(PY213) -m pip install --quiet --disable-pip-version-check $(TORCH213)
	$(PY213) -m pip install --quiet --disable-pip-version-check -e '.[test]' $(TORCH213)
	touch $(STAMP213)

demo: $(STAMP)
	$(PY) -m snpatch inspect resnet18

test: $(STAMP)
	$(PY) -m pytest

# Everything not marked slow (no subprocesses, compile, distributed, examples), 10 examples
# per property.
test-fast: $(STAMP)
	HYPOTHESIS_PROFILE=fast $(PY) -m pytest -m "not slow"

# The whole suite on torch 2.13; tests that need torchvision skip, saying so.
test-torch213: $(STAMP213)
	$(PY213) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check snpatch tests examples docs/_ext
	$(VENV)/bin/ruff format --check snpatch tests examples docs/_ext
	$(VENV)/bin/mypy

# The documentation site (mkdocs.yml, docs/): warnings, broken links and anchors included, are
# errors. Nothing is downloaded (no web fonts); the Material theme's end-of-life banner is muted.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

check: lint test

clean:
	rm -rf $(VENV) $(VENV213) site .pytest_cache .mypy_cache .ruff_cache .hypothesis
