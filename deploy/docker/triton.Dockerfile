# Triton for grym-synth: NVIDIA's release container plus what the python-backend models import.
# Build:  docker build -f deploy/docker/triton.Dockerfile --build-arg TRITON_VERSION=25.01 \
#           -t ghcr.io/grym-synth/triton:25.01-py3 .
#
# The ONNX models (wav2vec2, clap_text_encoder, unet, vae_decoder, vocoder) run on the container's native
# onnxruntime backend when tritonserver gets --model-config-name=onnxruntime|tensorrt. Every config.pbtxt (used with
# any other config name, or none, and always for audioldm and the coordinator) names our Python-based backend
# grym_python, the one the embedded server uses: it is installed below as backends/grym_python/ and runs on the
# image's python backend (backends/python: libtriton_python.so, stub, utils), the ONNX models with onnxruntime-gpu.
# The audioldm pipeline (BLS + scheduler arithmetic in torch) and the coordinator LLM need torch, transformers,
# diffusers and tokenizers inside the image. numpy stays < 2 as in the embedded build.
# An analysis-only deployment (wav2vec2 alone, --model-config-name=onnxruntime) can use
# nvcr.io/nvidia/tritonserver:<ver>-py3 unchanged.
ARG TRITON_VERSION=25.01
FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3

# curl: the compose healthcheck calls /v2/health/ready from inside the container.
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/*

# The image's python is the system interpreter; this image is single-purpose, so install into it.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_CACHE_DIR=1
RUN pip install "numpy>=1.26,<2" "torch==2.13.0" "transformers>=5.0" "diffusers>=0.42" "tokenizers>=0.22" \
      "onnxruntime-gpu>=1.20" "llguidance>=1.9,<2"

# Our Python-based backends (model_repository/backends/<name>/), where Triton looks for backend: "<name>":
# /opt/tritonserver/backends/<name>/model.py. The build context is the repository root.
COPY model_repository/backends/ /opt/tritonserver/backends/

USER triton-server
EXPOSE 8000 8001 8002
