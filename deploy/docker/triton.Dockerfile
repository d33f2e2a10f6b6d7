# Triton for grym-synth: NVIDIA's release container plus what the python-backend models import.
# Build:  docker build -f deploy/docker/triton.Dockerfile --build-arg TRITON_VERSION=25.01 \
#           -t ghcr.io/grym-synth/triton:25.01-py3 .
#
# The ONNX models (wav2vec2, clap_text_encoder, unet, vae_decoder, vocoder) run on the container's native
# onnxruntime backend when tritonserver gets --model-config-name=onnxruntime|tensorrt. The audioldm pipeline
# (BLS + scheduler arithmetic in torch) and the coordinator LLM are python-backend models: they need torch,
# transformers, diffusers and tokenizers inside the image. numpy stays < 2 as in the embedded build.
# An analysis-only deployment (wav2vec2 alone) can use nvcr.io/nvidia/tritonserver:<ver>-py3 unchanged.
ARG TRITON_VERSION=25.01
FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3

# curl: the compose healthcheck calls /v2/health/ready from inside the container.
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/*

# The image's python is the system interpreter; this image is single-purpose, so install into it.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_CACHE_DIR=1
RUN pip install "numpy>=1.26,<2" "torch==2.13.0" "transformers>=5.0" "diffusers>=0.42" "tokenizers>=0.22" \
      "onnxruntime-gpu>=1.20"

USER triton-server
EXPOSE 8000 8001 8002
