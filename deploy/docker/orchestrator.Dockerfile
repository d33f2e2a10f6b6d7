# grym-synth orchestrator image (also runs `grym-synth export` to materialise Triton's model repository).
# Build from the repository root:  docker build -f deploy/docker/orchestrator.Dockerfile -t ghcr.io/grym-synth/orchestrator:0.1.0 .
#
# The source tree is installed in place (pip -e) because the exporters copy the templates from
# <repo>/model_repository at run time. torch comes from PyTorch's CPU index: the orchestrator never runs a model
# itself (Triton does), it only traces them on CPU when exporting.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRYM_DATA_DIR=/var/lib/grym

RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin grym

WORKDIR /app
COPY pyproject.toml ./
COPY proto ./proto
COPY server ./server
COPY clients/python ./clients/python
COPY model_repository ./model_repository
COPY scripts/gen_protos.py ./scripts/gen_protos.py

RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
 && pip install -e . \
 && python scripts/gen_protos.py \
 && mkdir -p /var/lib/grym && chown grym:grym /var/lib/grym

USER 1000
EXPOSE 50051 9464
ENTRYPOINT ["grym-synth"]
CMD ["serve"]
