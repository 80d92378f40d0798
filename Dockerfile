# The image the k8s/ manifests run (ghcr.io/videodpo-ray/videodpo-ray:0.1.0): the pinned environment of
# pyproject.toml with this repository installed, the checkout as the working directory, so that a RayJob's
# `working_dir: "."` (and `ray job submit --working-dir .` from a pod) finds configs/ and jobs/.
#   docker build -t ghcr.io/videodpo-ray/videodpo-ray:0.1.0 . && docker push ghcr.io/videodpo-ray/videodpo-ray:0.1.0
# torch's Linux wheels bring their CUDA (13) libraries; PyAV's bring FFmpeg; the nodes need only the NVIDIA driver
# (580 or newer for CUDA 13). Build for the nodes' platform: `docker buildx build --platform linux/amd64`.
FROM python:3.11-slim
# wget: KubeRay's readiness and liveness probes call it inside every Ray container; gcc + libc headers: Triton
# compiles torch.compile's kernels at run time (without them `compile: true` falls back to eager with a warning)
RUN apt-get update && apt-get install -y --no-install-recommends wget gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /videodpo-ray
COPY pyproject.toml README.md ./
COPY videodpo_ray videodpo_ray
COPY actors actors
COPY jobs jobs
COPY configs configs
# editable: the installed jobs, actors and configs/ are the checkout (`videodpo-ray demo` finds its config there)
RUN pip install --no-cache-dir -e .
