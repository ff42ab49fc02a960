# whisperd: `make run` starts the daemon on its built-in defaults; `make test` runs every test but the
# fault-injection suite, which `make test-faults` runs.
# Both set up what they need on a fresh Debian machine (apt packages, a virtualenv in .venv).

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PREFIX ?= /usr/local
DESTDIR ?=
SYSCONFDIR ?= /etc
UNITDIR ?= $(PREFIX)/lib/systemd/system
PYTHON ?= python3
PIP_FLAGS ?=
# `make bench`: queued jobs bench/scale.py fills the store with (make bench SCALE_JOBS=100000 is quicker)
SCALE_JOBS ?= 1000000
APT_PACKAGES := curl espeak-ng sox ffmpeg socat gcc pkg-config libsystemd-dev python3-venv prometheus prometheus-alertmanager postgresql zsh
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test test-faults lint bench system-deps venv clean install install-share completion

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

# The fault-injection suite (kill -9 of the daemon, SIGKILL of workers): minutes, so not part of `make test`.
test-faults: venv system-deps
	$(VENV)/bin/pytest tests/faults $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check whisperd whisperctl tests bench
	$(VENV)/bin/ruff format --check whisperd whisperctl tests bench
	$(VENV)/bin/mypy

bench: venv system-deps
	$(PY) bench/throughput.py $(BENCH_ARGS)
	$(PY) bench/batching.py
	$(PY) bench/scrape_cost.py
	$(PY) bench/scale.py --jobs $(SCALE_JOBS)
	$(PY) bench/cli_start.py
	$(PY) bench/submits.py
	$(PY) bench/fleet.py
	$(PY) bench/http_api.py

# make install [PREFIX=/usr/local] [DESTDIR=staging] [PYTHON=python3] [PIP_FLAGS=...]: the package and its
# dependencies for PYTHON, the systemd units (ExecStart under PREFIX), sysusers.d, tmpfiles.d and etc/.
install: install-share
	$(PYTHON) -m pip install --quiet --no-warn-script-location --ignore-installed $(PIP_FLAGS) \
		--root=$(or $(DESTDIR),/) --prefix=$(PREFIX) '.[systemd]'
	install -d $(DESTDIR)$(UNITDIR) $(DESTDIR)$(PREFIX)/lib/sysusers.d $(DESTDIR)$(PREFIX)/lib/tmpfiles.d
	sed 's|/usr/local/bin/|$(PREFIX)/bin/|' systemd/whisperd.service > $(DESTDIR)$(UNITDIR)/whisperd.service
	install -m 0644 systemd/whisperd.socket $(DESTDIR)$(UNITDIR)/whisperd.socket
	install -m 0644 systemd/whisperd.sysusers $(DESTDIR)$(PREFIX)/lib/sysusers.d/whisperd.conf
	install -m 0644 systemd/whisperd.tmpfiles $(DESTDIR)$(PREFIX)/lib/tmpfiles.d/whisperd.conf
	install -D -m 0644 etc/whisperd.toml $(DESTDIR)$(SYSCONFDIR)/whisperd/whisperd.toml
	install -D -m 0644 -t $(DESTDIR)$(PREFIX)/share/whisperd/prometheus etc/prometheus/*.yml
	install -D -m 0644 -t $(DESTDIR)$(PREFIX)/share/whisperd/alertmanager etc/alertmanager/*.yml
	@echo "installed; then: systemd-sysusers; systemd-tmpfiles --create; systemctl daemon-reload;" \
		"systemctl enable --now whisperd.socket whisperd.service"

# What install puts under PREFIX/share besides the package: whisperctl's shell completion (bash-completion
# loads completions/whisperctl on first use; site-functions is on zsh's fpath) and the Grafana dashboard.
install-share:
	install -D -m 0644 etc/completion/whisperctl.bash \
		$(DESTDIR)$(PREFIX)/share/bash-completion/completions/whisperctl
	install -D -m 0644 etc/completion/_whisperctl $(DESTDIR)$(PREFIX)/share/zsh/site-functions/_whisperctl
	install -D -m 0644 -t $(DESTDIR)$(PREFIX)/share/whisperd/grafana etc/grafana/*.json

# etc/completion/ again from whisperctl's parser, after a command or an option changed (a test says when)
completion: venv
	$(VENV)/bin/whisperctl completion bash > etc/completion/whisperctl.bash
	$(VENV)/bin/whisperctl completion zsh > etc/completion/_whisperctl

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
