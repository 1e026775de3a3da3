# bootd: `make demo` boots a QEMU node from bootd; `make cluster` boots three Debian nodes and runs MPI
# on them; `make test` runs the whole suite.
# Both install what is missing first (tools/setup.sh).
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup compile test lint typecheck unit demo cluster bench clean

setup:
	@tools/setup.sh

# setup compiles too; this rebuilds whatever the stamp says (--force: all of it).
compile: setup
	$(PY) tools/compile.py $(COMPILE_ARGS)

lint: setup
	$(VENV)/bin/ruff check $(wildcard bootd tests bench tools capsules)

typecheck: setup
	$(VENV)/bin/mypy

# The suite runs the compiled DHCP path when there is one (the product); the unit tests then run once more on the
# sources, which an installed bootd without a build runs (BOOTD_PURE=1; about a minute). Not with PYTEST_ARGS.
test: setup lint typecheck
	BOOTD_STRICT=1 $(PY) -m pytest -q -rs --durations=25 $(PYTEST_ARGS)
	@if [ -z "$(PYTEST_ARGS)" ] && $(PY) -c 'import bootd, sys; sys.exit(not bootd.COMPILED)'; then \
	  echo "test: the unit tests again, on the sources (BOOTD_PURE=1)"; \
	  BOOTD_PURE=1 BOOTD_STRICT=1 $(PY) -m pytest -q -p no:cacheprovider tests/unit; fi

# The failover drill of README "Scaling out" alone (make test runs it too): 300 simulated nodes a run and
# one QEMU node.
drill: setup
	BOOTD_STRICT=1 $(PY) -m pytest -q -rs --durations=5 tests/integration/test_failover_drill.py $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

demo: setup
	@if [ -x tools/demo.sh ]; then tools/demo.sh $(DEMO_ARGS); else echo "bootd demo: not built yet"; fi

cluster: setup
	@tools/cluster.sh $(CLUSTER_ARGS)

clean:
	rm -rf build *.egg-info .pytest_cache .mypy_cache .ruff_cache
	-$(PY) tools/compile.py --clean
