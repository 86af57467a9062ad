# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test unit integration bench bench-scale mutate lint check-config clean

$(STAMP): requirements.txt requirements-dev.txt setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@# xds-protos ships an old copy of opentelemetry-proto's modules (same paths): whichever
	@# installs last wins, and the OTLP exporter needs its own. Reinstall it last.
	$(PY) -m pip install --quiet --force-reinstall --no-deps "$$(grep '^opentelemetry-proto==' requirements.txt)"
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

## run: set up and start the gateway on the bundled example (curl localhost:8080/api/demo/hello)
run: $(STAMP)
	examples/demo/run.sh

## test: set up and run the whole suite (installs Debian's redis-server for the rate-limit
## tests and chromium for the dashboard's browser tests)
test: $(STAMP)
	@command -v redis-server >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq redis-server chromium >/dev/null)
	$(PY) -m pytest

unit: $(STAMP)
	$(PY) -m pytest tests/unit

integration: $(STAMP)
	$(PY) -m pytest tests/integration

## bench: gateway vs a minimal proxy floor, both in front of nginx (BENCH_ARGS="--mesh istio" adds an Istio sidecar-mode gateway)
bench: $(STAMP)
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || \
		(apt-get update -qq && apt-get install -y -qq nginx wrk >/dev/null)
	@command -v wrk >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq wrk >/dev/null)
	$(PY) -m bench.run $(BENCH_ARGS)

## bench-scale: Consul, then Kubernetes (Linkerd) discovery at 1,000 services x 10 instances, 2 workers (figures vs targets)
bench-scale: $(STAMP)
	$(PY) -m bench.scale
	$(PY) -m bench.scale --mesh linkerd

## mutate: mutation testing (mutmut) of MODULES against the in-process suites
MODULES ?= odin_gw.proxy odin_gw.passive_health odin_gw.admin odin_gw.edge_worker odin_gw.edge_reader \
	odin_gw.edge_limits odin_gw.accesslog odin_gw.config.schema
mutate: $(STAMP)
	$(PY) -m pip install --quiet mutmut==3.8.1
	rm -rf mutants
	$(VENV)/bin/mutmut run $(foreach m,$(MODULES),"$(m)*") >/dev/null 2>&1 || true
	$(PY) -m tools.mutation_score $(MODULES)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

check-config: $(STAMP)
	$(VENV)/bin/odin-gw check-config $(or $(CONFIG),examples/demo/config.yaml)

clean:
	rm -rf $(VENV) build *.egg-info mutants
