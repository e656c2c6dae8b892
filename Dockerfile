# vlm-service image: the same `make install` as a developer's checkout, into /opt/venv, from the
# server's lock file (requirements/runtime.lock: exact versions with hashes, no test tools).
# One image serves both compose profiles: the torch wheel runs on CPU and, with a GPU reserved, on CUDA.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data/huggingface \
    VLM_CACHE_DIR=/data/vlm-service

COPY Makefile pyproject.toml README.md ./
COPY requirements ./requirements
COPY protos ./protos
COPY vlm_service ./vlm_service
COPY vlm_checkpoints ./vlm_checkpoints
COPY clients ./clients
RUN make install VENV=/opt/venv EXTRAS= LOCK=requirements/runtime.lock && rm -rf /root/.cache
ENV PATH=/opt/venv/bin:$PATH

VOLUME ["/data"]
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["vlm-service", "health", "--server", "localhost:50051"]
CMD ["vlm-service", "serve"]
