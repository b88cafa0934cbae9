# harness on a CUDA machine.
#   docker build -t harness .
#   docker run --gpus all -e OPENAI_API_KEY -v $PWD/results:/app/results harness \
#       eval --env tau-airline --model openai/gpt-4.1-mini --user-model openai/gpt-4.1-mini --trials 4
# The τ data is pulled at build time into the image's cache (set HARNESS_DATA_DIR at run time
# to use a mounted mirror instead, e.g. on offline clusters).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    HARNESS_CACHE_DIR=/opt/harness-cache

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# CUDA build of torch from the PyTorch index matching the base image, then the package.
RUN pip install "torch>=2.4,<3" --index-url https://download.pytorch.org/whl/cu128
COPY pyproject.toml README.md ./
COPY harness ./harness
COPY envs ./envs
COPY trainers ./trainers
RUN pip install .

RUN harness data pull tau-airline --data-version tau3 \
    && harness data pull tau-airline --data-version tau2

ENTRYPOINT ["harness"]
CMD ["--help"]
