# HistoScope: `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Xvfb and the GL / xcb libraries Qt and napari's canvas need.
SYSPKGS := xvfb xauth libgl1 libegl1 libgl1-mesa-dri libxkbcommon-x11-0 libxcb-cursor0 \
	libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 \
	libxcb-shape0 libxcb-xinerama0 libdbus-1-3 libfontconfig1
# Run Qt programs on the real display if there is one, else on a virtual one.
GUI := $(if $(DISPLAY),env QT_QPA_PLATFORM=xcb,xvfb-run -a -s "-screen 0 1920x1200x24" env QT_QPA_PLATFORM=xcb)

.PHONY: demo test lint bench sysdeps venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

sysdeps:
	@if dpkg -s $(SYSPKGS) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Installing system packages: $(SYSPKGS)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSPKGS) >/dev/null; \
	else \
		echo "Missing system packages. Install them with:"; \
		echo "  sudo apt-get install -y $(SYSPKGS)"; exit 1; \
	fi

demo: $(STAMP) sysdeps
	$(GUI) $(VENV)/bin/histoscope demo $(if $(DISPLAY),,--screenshot out/demo.png)

test: $(STAMP) sysdeps lint
	$(GUI) $(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	$(PY) benchmarks/bench_slide_io.py

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
