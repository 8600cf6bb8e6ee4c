# mvjax speech server, CPU image.
#
#   docker build -t mvjax-serve .
#   docker run --rm -p 8000:8000 mvjax-serve --demo                       # random model, demo voice
#   docker run --rm -p 8000:8000 -v $PWD/models:/models -v $PWD/voices:/voices \
#       -e MVJAX_API_KEY=change-me mvjax-serve --model /models/metavoice-1b --voices /voices
#
# CUDA: build FROM an NVIDIA CUDA 12 runtime image with Python 3.11 instead and install
# "jax[cuda12]" before mvjax (see README, "Speech server").
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MVJAX_CACHE=/cache

# libsndfile for audio formats (mp3 and opus included in bookworm's 1.2), a compiler for the
# CPU int8 kernel that mvjax builds on first use.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libsndfile1 g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY mvjax ./mvjax
COPY convert_weights ./convert_weights
RUN pip install '.[serve]'

# An unprivileged user; converted models, compiled programs and voices live in mounted volumes.
RUN useradd --create-home --uid 1000 mvjax && mkdir -p /cache /voices && chown mvjax /cache /voices
USER mvjax
VOLUME ["/cache", "/voices"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"

# Inside a container the server must listen on all interfaces to be reachable through -p.
ENTRYPOINT ["python", "-m", "mvjax.serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--demo"]
