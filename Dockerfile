FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY config ./config
RUN pip install . && useradd --system --uid 10001 --no-create-home proxy \
    && mkdir -p /var/cache/bifrost-video-proxy && chown proxy /var/cache/bifrost-video-proxy
USER proxy
# The content store (content_cache = disk): a volume, so stored videos survive restarts.
ENV PROXY_CONTENT_DIR=/var/cache/bifrost-video-proxy
VOLUME ["/var/cache/bifrost-video-proxy"]

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
# Settings come from PROXY_* variables (e.g. PROXY_UPSTREAM_URL) or --config.
ENTRYPOINT ["bifrost-video-proxy", "--host", "0.0.0.0"]
