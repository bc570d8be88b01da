# Mailroom image: `mailroom` is the entry point; the command picks the role (web, worker,
# migrate). Dependencies are installed with uv in a build stage; the runtime stage has no
# compiler, no test dependencies and runs as an unprivileged user.
FROM python:3.11-slim-bookworm AS build

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/opt/mailroom \
    UV_PYTHON_DOWNLOADS=never \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --no-cache-dir uv==0.9.13

WORKDIR /src
# Dependencies first, so code changes do not reinstall them.
COPY pyproject.toml README.md ./
RUN uv sync --no-dev --no-install-project
COPY mailroom ./mailroom
COPY shared ./shared
COPY web ./web
COPY worker ./worker
RUN uv sync --no-dev --no-editable


FROM python:3.11-slim-bookworm

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin mailroom
COPY --from=build /opt/mailroom /opt/mailroom

ENV PATH=/opt/mailroom/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MAILROOM_WEB_HOST=0.0.0.0 \
    MAILROOM_METRICS_HOST=0.0.0.0 \
    MAILROOM_LOG_FORMAT=json \
    MAILROOM_HEALTH_URL=http://127.0.0.1:8080/healthz

USER 10001
EXPOSE 8080 9100
# Web containers answer on 8080, workers on their metrics port: compose sets the URL per role.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['MAILROOM_HEALTH_URL'], timeout=4)"]

ENTRYPOINT ["mailroom"]
CMD ["web"]
