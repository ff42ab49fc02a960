# whisperd: `make run` starts the daemon on its built-in defaults; `make test` runs every test.
# Both set up what they need on a fresh Debian machine (apt packages, a virtualenv in .venv).

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PREFIX ?= /usr/local
DESTDIR ?=
APT_PACKAGES := espeak-ng sox ffmpeg socat gcc pkg-config libsystemd-dev python3-venv prometheus prometheus-alertmanager
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint bench system-deps venv clean install

system-deps:
	@missing=""; for pkg in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q "ok installed" || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml | system-deps
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(STAMP)

run: venv
	$(VENV)/bin/whisperd $(ARGS)

test: venv system-deps
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check whisperd whisperctl tests bench
	$(VENV)/bin/ruff format --check whisperd whisperctl tests bench
	$(VENV)/bin/mypy

bench: venv system-deps
	$(PY) bench/throughput.py $(BENCH_ARGS)
	$(PY) bench/scrape_cost.py

install: venv
	$(PY) -m pip install --no-deps --prefix=$(PREFIX) $(if $(DESTDIR),--root=$(DESTDIR)) .
	install -D -m 0644 etc/whisperd.toml $(DESTDIR)/etc/whisperd/whisperd.toml

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
