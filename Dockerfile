# medtl on CPU: the core and the web UI (medtl[ui]) on PyTorch's CPU-only wheels (no CUDA libraries).
#   docker build -t medtl .
#   docker run --rm medtl                                  # medtl --help
#   docker run --rm -v "$PWD:/work" medtl medtl train --config /work/configs/sample_ct.yaml \
#       --data /work/sample_data/manifest.csv --out /work/runs/ct
#   docker run --rm -p 7860:7860 -v "$PWD/runs:/runs:ro" -e MEDTL_AUTH=USER:PASS medtl \
#       medtl serve /runs/ct --host 0.0.0.0
# docs/install.md says more. CI (.ci/run) builds it and runs `medtl --help` where a Docker daemon is reachable,
# and lints it with hadolint otherwise.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# PyTorch's CPU-only builds first: medtl's torch==2.14.1 / torchvision==0.29.1 pins are then met by them
# (2.14.1+cpu), and pip does not fetch the default wheels with their CUDA libraries (about 4 GiB).
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu

# medtl itself, with the web UI; the source is not kept in the image
COPY pyproject.toml README.md LICENSE /tmp/medtl/
COPY medtl /tmp/medtl/medtl
COPY ui /tmp/medtl/ui
RUN pip install --no-cache-dir "/tmp/medtl[ui]" && rm -rf /tmp/medtl

# not root: runs and caches are written under the user's home (mount folders to keep them)
RUN useradd --create-home --uid 1000 --user-group medtl
USER 1000:1000
WORKDIR /home/medtl

EXPOSE 7860
CMD ["medtl", "--help"]
