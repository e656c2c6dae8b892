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
# Every install takes exact versions, with their hashes, from a lock file that `make lock` compiles
# from pyproject.toml (requirements/*.in say what goes in each): dev.lock for a checkout, CI and the
# bench (the project with every extra, on the torch 2.14.1 wheels it is tested with), runtime.lock for
# the Docker image (the server alone). The vlm-client library itself keeps ranges for its users.
LOCK ?= requirements/dev.lock
ARGS ?=
# Extras of the project's own install: [dev,bench] adds the test, lint and bench tools (all in
# dev.lock); the Docker image uses none.
EXTRAS ?= [dev,bench]
PYTEST_ARGS ?=
# Where the tiny checkpoints are built (the same place `make serve` uses): `make test` builds them
# once before pytest (minutes on a 2-core CPU; cached by a digest of the code that makes them).
CHECKPOINTS ?= $(or $(VLM_CACHE_DIR),$(HOME)/.cache/vlm-service)
# The validators of deploy/kubernetes' custom resources (npm packages, pinned in its package-lock.json).
DEPLOY_TOOLS := deploy/validate/node_modules/.installed
# buf (proto lint and breaking-change checks), from the @bufbuild/buf npm package into .tools/.
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
# What `buf breaking` compares the working tree's protos with: the previous commit's.
BUF_AGAINST ?= .git\#ref=HEAD~1,subdir=protos
# `make fresh-check`: the suite in a new virtual environment made from the lock with pip's cache off.
FRESH_VENV ?= $(or $(TMPDIR),/tmp)/vlm-service-fresh-venv
PIP_COMPILE = $(BIN)/pip-compile --quiet --generate-hashes --strip-extras --no-emit-index-url \
	--no-emit-find-links --unsafe-package vlm-client --unsafe-package vlm-service

.PHONY: install proto proto-check dist checkpoints ship deploy-tools system-deps serve test fresh-check lock \
	lint docs bench bench-real openvino-env bench-flood bench-load bench-watch bench-tracing accuracy soak clean

install: $(STAMP) $(STUBS)

# The virtual environment with every locked package (exact versions, hashes checked; nothing else is
# resolved), then `pip check`: what the lock holds is consistent. Again whenever the lock changes.
$(TOOLS): $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --require-hashes --no-deps -r $(LOCK)
	$(PIP) check
	touch $@

# The two distributions, editable and without resolving anything (their dependencies come from the
# lock; the build runs in the venv, on the lock's setuptools and grpcio-tools): vlm-client (clients/:
# the client, its CLI and the stubs, which its build generates) and vlm-service (the server).
$(STAMP): pyproject.toml clients/pyproject.toml clients/setup.py $(TOOLS) | $(STUBS)
	$(PIP) install --quiet --no-deps --no-build-isolation -e ./clients -e '.$(EXTRAS)'
	$(PIP) check
	touch $@

# Recompile the lock files from pyproject.toml and requirements/*.in. Pins already in a lock are kept
# unless pyproject.toml no longer allows them; `make lock ARGS=--upgrade` moves everything to the newest.
lock: $(TOOLS)
	$(PIP_COMPILE) $(ARGS) -o requirements/dev.lock requirements/dev.in
	$(PIP_COMPILE) $(ARGS) -o requirements/runtime.lock requirements/runtime.in

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
# smoke test serves (the 4.4 GB qwen2-vl-2b-shapes is never built here), built by the code in
# vlm_checkpoints/. tiny-smolvlm is built (about 2.5 minutes; the front-door test compares it with its
# shipped copy); tiny-qwen2-vl and tiny-moondream are taken as shipped while their keys are current
# (training them takes about 12 minutes; a test fails when a shipped copy is stale: `make ship`).
checkpoints: install
	$(BIN)/vlm-service build tiny-smolvlm --cache-dir $(CHECKPOINTS)
	$(BIN)/vlm-service build --random-twins --shipped --cache-dir $(CHECKPOINTS)
	$(BIN)/vlm-service build smolvlm-256m-shapes --cache-dir $(CHECKPOINTS)

# Rebuild the checkpoints shipped with the package (the tiny ones, in vlm_checkpoints/shipped/) from the
# code and commit the result: the tests fail while a shipped copy's key differs from what the code gives.
ship: install
	$(BIN)/python -m vlm_checkpoints.ship --cache-dir $(CHECKPOINTS)

deploy-tools: $(DEPLOY_TOOLS)

$(DEPLOY_TOOLS): deploy/validate/package.json deploy/validate/package-lock.json
	cd deploy/validate && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# What the tests need outside Python: nginx (the balancer tests' real grpc_pass proxy) and npm (the
# deploy validators, buf). As root with apt-get, nginx is installed; otherwise one line says what to do.
system-deps:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "make: installing nginx-light (Debian) for the balancer tests"; \
			{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
				nginx-light >/dev/null; } || { echo "make: could not install nginx-light: install nginx (with grpc_pass) and rerun" >&2; exit 1; }; \
		else \
			echo "make test needs nginx (the balancer tests): sudo apt-get install nginx-light (Debian/Ubuntu), then rerun" >&2; exit 1; \
		fi; }
	@command -v npm >/dev/null || { echo "make test needs Node.js and npm (the deploy validators): sudo apt-get install npm, then rerun" >&2; exit 1; }

test: system-deps checkpoints $(DEPLOY_TOOLS)
	VLM_TEST_CACHE_DIR=$(CHECKPOINTS) $(BIN)/python -m pytest $(PYTEST_ARGS)

# The whole suite in a new virtual environment created from the lock, with pip's cache off: a check a
# warm machine (packages installed by hand, a cache with other versions) cannot fool. CI does the same
# on its fresh clone.
fresh-check:
	rm -rf $(FRESH_VENV)
	PIP_NO_CACHE_DIR=1 $(MAKE) --no-print-directory test VENV=$(FRESH_VENV)

soak: checkpoints
	VLM_TEST_CACHE_DIR=$(CHECKPOINTS) VLM_SOAK_SECONDS=$${VLM_SOAK_SECONDS:-180} \
		$(BIN)/python -m pytest -m soak -s tests/integration/test_soak.py

bench: install checkpoints
	VLM_CACHE_DIR=$(CHECKPOINTS) $(BIN)/python bench/stream_bench.py $(ARGS)

# The real-size mode: the smolvlm-256m-shapes twin on 512x512 pictures, one tile and 17 views, against
# the same two references (the issue's rows and goals; about 15 minutes on a 2-core CPU).
bench-real: install checkpoints
	VLM_CACHE_DIR=$(CHECKPOINTS) $(BIN)/python bench/real_size_bench.py $(ARGS)

# The OpenVINO reference of bench-real (docs/openvino.md): a venv of its own, because optimum-intel
# needs transformers < 5.6 (about 6 GB; not part of any install of the service). bench-real adds its
# rows when .venv-openvino exists.
openvino-env: requirements/openvino.lock
	test -x .venv-openvino/bin/python || $(PYTHON) -m venv .venv-openvino
	.venv-openvino/bin/python -m pip install --quiet --require-hashes -r requirements/openvino.lock

# Big pictures against a running stream and health, with a real model in a real server: 4 Captions of
# new 36-megapixel PNGs at once (ARGS="--twin real" for the SmolVLM-256M twin; minutes on a 2-core CPU).
bench-flood: install checkpoints
	VLM_CACHE_DIR=$(CHECKPOINTS) $(BIN)/python bench/flood_bench.py $(ARGS)

# How the service degrades beside another busy process, by thread setting (the SmolVLM-256M twin).
bench-load: install checkpoints
	VLM_CACHE_DIR=$(CHECKPOINTS) $(BIN)/python bench/load_bench.py $(ARGS)

# Watch: a 20 frames/s feed for 10 s under each policy against a lone Caption (memory, skipped frames,
# time to first text after an answer ends or after an interrupt).
bench-watch: install checkpoints
	VLM_CACHE_DIR=$(CHECKPOINTS) $(BIN)/python bench/watch_bench.py $(ARGS)

# What tracing costs per token: tracing off against on (spans exported over OTLP to a local receiver).
bench-tracing: install checkpoints
	VLM_CACHE_DIR=$(CHECKPOINTS) $(BIN)/python bench/tracing_bench.py $(ARGS)

# How often the tiny demo checkpoints describe held-out pictures right (the accuracy figures of docs/models.md).
accuracy: install checkpoints
	VLM_CACHE_DIR=$(CHECKPOINTS) $(BIN)/python bench/tiny_accuracy.py $(ARGS)

lint: install
	$(BIN)/ruff check vlm_service vlm_checkpoints clients tests bench docs
	$(BIN)/ruff format --check vlm_service vlm_checkpoints clients tests bench docs

# The documentation site (mkdocs.yml, docs/) into site/. --strict: a broken link or anchor, or a page left
# out of the nav, fails the build. docs/gen_pages.py renders the API reference (from the protos) and
# the settings table (from vlm_service/config.py) during the build. The two variables silence the
# banners that mkdocs-gen-files' properdocs and mkdocs-material print on every build.
docs: install
	DISABLE_MKDOCS_2_WARNING=true NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .tools dist build site clients/build .pytest_cache deploy/validate/node_modules clients/vlm/v1/*_pb2*.py clients/vlm/v1/*_pb2.pyi
