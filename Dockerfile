# lmops server image: `lmops serve` on port 8000, one process, non-root.
#
#   docker build -t lmops .                                   CPU (PyTorch's CPU wheel: ~200 MB, not ~2.5 GB)
#   docker build -t lmops --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .        CUDA
#   docker run -p 8000:8000 -v "$PWD/bundle:/model:ro" lmops  a bundle (`lmops package REF bundle`) mounted
#   docker build -t lmops-model --target baked .              a bundle baked in: ./bundle copied to /model
#   docker run -p 8000:8000 -e LMOPS__STORE__DATABASE_URL=postgresql+psycopg://... lmops --endpoint chat
#
# The bundle's manifest is checked before the model loads (a changed file stops the container with its
# name). API keys, the request log and endpoints live in the metadata store: by default a SQLite file in
# the container's workspace (/home/lmops/ws, a volume to keep it), in production a shared PostgreSQL
# database given by the environment. tests/ship/test_container.py runs this file's install and start
# commands (the build itself needs a Docker daemon).

ARG PYTHON=3.11
FROM python:${PYTHON}-slim AS runtime
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH=torch==2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    LMOPS_WORKSPACE=/home/lmops/ws MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
RUN useradd --create-home --uid 10001 --user-group lmops
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lmops ./lmops
# install: PyTorch from its index first (the CPU or CUDA build), then lmops and the PostgreSQL driver
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH}" && pip install ".[postgres]" && rm -rf /src
USER lmops
WORKDIR /home/lmops
# start: a workspace for the store and state, then the server (exec form: SIGTERM reaches it and it drains)
RUN lmops init /home/lmops/ws
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["lmops", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--bundle", "/model"]

FROM runtime AS baked
COPY --chown=lmops:lmops bundle/ /model/

# the default target: the model mounted at /model (or another command given to `docker run`)
FROM runtime AS mounted
