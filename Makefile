# The README's two commands: `make demo` and `make test`. Both create .venv/ when it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.vitattn-installed
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install lint test demo demo-model bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,ray]'
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check vitattn tests tools
	$(VENV)/bin/mypy

test: lint
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q

demo: install
	$(PY) -m vitattn.demo.run vitattn-out/demo

bench: install
	$(PY) -m tools.bench
	$(PY) -m tools.bench_ray

clean:
	rm -rf vitattn-out .pytest_cache .mypy_cache .ruff_cache

demo-model: install
	$(PY) -m tools.train_demo --out vitattn/demo/shapes_vit
