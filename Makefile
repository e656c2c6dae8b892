# The README's commands. `make serve` and `make test` set everything up first, so a fresh clone
# needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
TOOLS := $(VENV)/.tools
STAMP := $(VENV)/.installed
STUBS := clients/vlm/v1/vlm_service_pb2.py
PROTOS := $(wildcard protos/vlm/v1/*.proto)
# torch and torchvision are pinned to the wheels this project is tested with.
TORCH := torch==2.14.1 torchvision==0.29.1
ARGS ?=
# Extras installed with the project: [dev] adds the test and lint tools; the Docker image uses none.
EXTRAS ?= [dev]
PYTEST_ARGS ?=
# Where the tiny checkpoints are built (the same place `make serve` uses): `make test` builds them
# once before pytest (minutes on a 2-core CPU; cached by a digest of the code that makes them).
CHECKPOINTS ?= $(or $(VLM_CACHE_DIR),$(HOME)/.cache/vlm-service)
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: install proto checkpoints serve test lint bench bench-tracing soak clean

install: $(STAMP) $(STUBS)

# The virtual environment with torch and the protobuf compiler (what the stubs need).
$(TOOLS):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH) grpcio-tools==1.85.1
	touch $@

# The project itself (editable) with its dependencies; it packages the generated stubs.
$(STAMP): pyproject.toml | $(TOOLS) $(STUBS)
	$(PIP) install --quiet -e '.$(EXTRAS)'
	touch $@

# Python stubs (+ .pyi type stubs) from the .proto files, into clients/vlm/v1 (not committed).
proto: | $(TOOLS)
	rm -rf clients/vlm
	$(MAKE) --no-print-directory $(STUBS)

$(STUBS): $(PROTOS) | $(TOOLS)
	mkdir -p clients/vlm/v1
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=clients --pyi_out=clients \
		--grpc_python_out=clients $(PROTOS)
	touch clients/vlm/__init__.py clients/vlm/v1/__init__.py

serve: install
	$(BIN)/vlm-service serve $(ARGS)

checkpoints: install
	$(BIN)/vlm-service build --random-twins --cache-dir $(CHECKPOINTS)

test: checkpoints
	VLM_TEST_CACHE_DIR=$(CHECKPOINTS) $(BIN)/python -m pytest $(PYTEST_ARGS)

soak: checkpoints
	VLM_TEST_CACHE_DIR=$(CHECKPOINTS) VLM_SOAK_SECONDS=$${VLM_SOAK_SECONDS:-180} \
		$(BIN)/python -m pytest -m soak -s tests/integration/test_soak.py

# The bench also needs its peer (`transformers serve`) and the plot library: the [bench] extra.
$(BENCH_STAMP): pyproject.toml | $(STAMP)
	$(PIP) install --quiet -e '.[dev,bench]'
	touch $@

bench: install checkpoints $(BENCH_STAMP)
	VLM_CACHE_DIR=$(CHECKPOINTS) $(BIN)/python bench/stream_bench.py $(ARGS)

# What tracing costs per token: tracing off against on (spans exported over OTLP to a local receiver).
bench-tracing: install checkpoints
	VLM_CACHE_DIR=$(CHECKPOINTS) $(BIN)/python bench/tracing_bench.py $(ARGS)

lint: install
	$(BIN)/ruff check vlm_service clients tests bench
	$(BIN)/ruff format --check vlm_service clients tests bench

clean:
	rm -rf $(VENV) clients/vlm .pytest_cache
