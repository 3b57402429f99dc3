# cache_router: the router (and, for trying it, a simulated engine) in one small image.
#
#   docker build -t cache-router .
#   docker run -p 30000:30000 -e CACHE_ROUTER_WORKER_URLS="http://10.0.0.1:8000 http://10.0.0.2:8000" cache-router
#
# Every option is a flag after the image name or a CACHE_ROUTER_* variable
# (docs/configuration.md). docker-compose.yml runs it in front of two simulated engines.
# tests/test_container.py runs this file's ENTRYPOINT and CMD, as written, on 127.0.0.1.
# 3.11: the router's CPU per request is lowest there (docs/benchmarks.md, "Which Python").
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY cache_router ./cache_router
RUN pip install '.[serve]' \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin router \
    && rm -rf /src

WORKDIR /
USER router
EXPOSE 30000

# /liveness answers 200 while the process serves (cache_router/ops/probes.py); the
# orchestrator's readiness check belongs on /readiness (a worker must be healthy).
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:30000/liveness', timeout=2)"]

# SIGTERM (docker stop) drains requests in flight, then exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cache-router"]
CMD ["serve", "--host", "0.0.0.0", "--port", "30000"]
