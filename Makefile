# The README's two commands: `make demo` and `make test`. Both create .venv/ when it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.vitattn-installed
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install browser lint test screenshots demo demo-model bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,ray]'
	$(MAKE) --no-print-directory browser
	touch $(STAMP)

# The explorer's page tests drive the system's Chromium (Debian's chromium), installed here when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing chromium (apt-get) for the explorer's browser tests" >&2; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; fi; }

lint: install
	$(VENV)/bin/ruff check vitattn tests tools
	$(VENV)/bin/mypy

test: lint browser
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q

screenshots: install browser  # the README's explorer pictures, taken by the test suite's browser
	VITATTN_SCREENSHOTS=1 HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q tests/test_explorer_cli.py -k screenshots

demo: install
	$(PY) -m vitattn.demo.run vitattn-out/demo

bench: install
	$(PY) -m tools.bench
	$(PY) -m tools.bench_ray
	$(PY) -m tools.bench_explorer

clean:
	rm -rf vitattn-out .pytest_cache .mypy_cache .ruff_cache

demo-model: install
	$(PY) -m tools.train_demo --out vitattn/demo/shapes_vit
