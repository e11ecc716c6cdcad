# modelq worker / gateway image. On a GPU host it runs with the CUDA build of torch;
# build a CPU-only image with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface

RUN pip install torch --index-url "${TORCH_INDEX_URL}"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY tasks ./tasks
COPY worker ./worker
RUN pip install ".[worker,gateway,flower]"

RUN useradd --create-home --uid 1000 modelq && mkdir -p /cache/huggingface && chown -R modelq /cache
USER modelq

ENTRYPOINT ["modelq"]
CMD ["worker", "--device", "cuda:0"]
