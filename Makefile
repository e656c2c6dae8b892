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
# The validators of deploy/kubernetes' custom resources (npm packages, pinned in its package-lock.json).
DEPLOY_TOOLS := deploy/validate/node_modules/.installed
# buf (proto lint and breaking-change checks), from the @bufbuild/buf npm package into .tools/.
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
# What `buf breaking` compares the working tree's protos with: the previous commit's.
BUF_AGAINST ?= .git\#ref=HEAD~1,subdir=protos

.PHONY: install proto proto-check dist checkpoints ship deploy-tools serve test lint bench bench-real bench-watch bench-tracing accuracy soak clean

install: $(STAMP) $(STUBS)

# The virtual environment with torch and the protobuf compiler (what the stubs need).
$(TOOLS):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH) grpcio-tools==1.85.1
	touch $@

# The two distributions, editable: vlm-client (clients/: the client, its CLI and the stubs, which its
# build generates) and vlm-service (the server, which depends on vlm-client) with its dependencies.
$(STAMP): pyproject.toml clients/pyproject.toml clients/setup.py | $(TOOLS) $(STUBS)
	$(PIP) install --quiet -e ./clients -e '.$(EXTRAS)'
	@# In a venv from before the split, replacing the old vlm-service removes the vlm-client script it owned.
	test -x $(BIN)/vlm-client || $(PIP) install --quiet --no-deps --force-reinstall -e ./clients
	touch $@

# Python stubs (+ .pyi type stubs) from the .proto files, into clients/vlm/v1 (not committed; the
# vlm-client build generates the same files into its wheel).
proto: | $(TOOLS)
	rm -f clients/vlm/v1/*_pb2*.py clients/vlm/v1/*_pb2.pyi
	$(MAKE) --no-print-directory $(STUBS)

$(STUBS): $(PROTOS) | $(TOOLS)
	mkdir -p clients/vlm/v1
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=clients --pyi_out=clients \
		--grpc_python_out=clients $(PROTOS)

# The contract's checks: buf lint (style) and buf breaking (wire and source compatibility with the
# previous commit's protos; BUF_AGAINST=... to compare with something else). Config: protos/buf.yaml.
$(BUF):
	npm install --prefix .tools --no-save --no-audit --no-fund --loglevel=error @bufbuild/buf@$(BUF_VERSION)

proto-check: $(BUF)
	$(BUF) lint protos
	@git rev-parse --quiet --verify HEAD~1 >/dev/null || \
		{ echo "proto-check: buf breaking needs the previous commit (HEAD~1); use a full clone" >&2; exit 1; }
	$(BUF) breaking protos --against '$(BUF_AGAINST)'

# Both distributions as a release builds them (sdist, then the wheel from the sdist), into dist/.
dist: install
	rm -rf dist clients/build build
	$(BIN)/python -m build --outdir dist clients
	$(BIN)/python -m build --outdir dist .

serve: install
	$(BIN)/vlm-service serve $(ARGS)

# The tiny checkpoints with their random-weights twins, and the real-size SmolVLM-256M twin that one
# smoke test serves (about a minute; the 4.4 GB qwen2-vl-2b-shapes is never built here), built by the
# code in vlm_checkpoints/.
checkpoints: install
	$(BIN)/vlm-service build --random-twins --cache-dir $(CHECKPOINTS)
	$(BIN)/vlm-service build smolvlm-256m-shapes --cache-dir $(CHECKPOINTS)

# Rebuild the checkpoint shipped with the package (tiny-smolvlm, in vlm_checkpoints/shipped/) from the
# code and commit the result: the tests fail while the shipped copy's key differs from what the code gives.
ship: install
	$(BIN)/python -m vlm_checkpoints.ship --cache-dir $(CHECKPOINTS)

deploy-tools: $(DEPLOY_TOOLS)

$(DEPLOY_TOOLS): deploy/validate/package.json deploy/validate/package-lock.json
	cd deploy/validate && npm ci --no-audit --no-fund --loglevel=error
	touch $@

test: checkpoints $(DEPLOY_TOOLS)
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

# The real-size mode: the smolvlm-256m-shapes twin on 512x512 pictures, one tile and 17 views, against
# the same two references (the issue's rows and goals; about 15 minutes on a 2-core CPU).
bench-real: install checkpoints $(BENCH_STAMP)
	VLM_CACHE_DIR=$(CHECKPOINTS) $(BIN)/python bench/real_size_bench.py $(ARGS)

# Watch: a 20 frames/s feed for 10 s under each policy against a lone Caption (memory, skipped frames,
# time to first text after an answer ends or after an interrupt).
bench-watch: install checkpoints
	VLM_CACHE_DIR=$(CHECKPOINTS) $(BIN)/python bench/watch_bench.py $(ARGS)

# What tracing costs per token: tracing off against on (spans exported over OTLP to a local receiver).
bench-tracing: install checkpoints
	VLM_CACHE_DIR=$(CHECKPOINTS) $(BIN)/python bench/tracing_bench.py $(ARGS)

# How often the tiny demo checkpoints describe held-out pictures right (the README's accuracy figures).
accuracy: install checkpoints
	VLM_CACHE_DIR=$(CHECKPOINTS) $(BIN)/python bench/tiny_accuracy.py $(ARGS)

lint: install
	$(BIN)/ruff check vlm_service vlm_checkpoints clients tests bench
	$(BIN)/ruff format --check vlm_service vlm_checkpoints clients tests bench

clean:
	rm -rf $(VENV) .tools dist build clients/build .pytest_cache deploy/validate/node_modules clients/vlm/v1/*_pb2*.py clients/vlm/v1/*_pb2.pyi
