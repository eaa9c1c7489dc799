# pgscout: the PostgreSQL sidecar proxy as a container image.
#
# Build from the repository root:   docker build -t pgscout .
# Run beside an application:        docker run -e PGSCOUT_PROXY_UPSTREAM=postgresql://db:5432/app pgscout
#
# The install step is the same `pip install` of this repository that .ci/run performs (without the
# test extras), so the image runs exactly what CI tested. asyncpg, uvloop and pglast ship manylinux
# wheels for amd64 and arm64; gcc in the build stage compiles pgscout's own hot path (setup.py).

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends gcc && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/pgscout
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
RUN /opt/pgscout/bin/python3 -m pip install . \
 && /opt/pgscout/bin/python3 -c "import uvloop, pglast, asyncpg, pgscout.dataplane.decoder as d; assert d.__file__.endswith('.so')"

FROM python:3.11-slim
LABEL org.opencontainers.image.title="pgscout" \
      org.opencontainers.image.description="Transparent PostgreSQL sidecar: statement fingerprints, slow-query log, N+1 detection, connection budgets" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin pgscout
COPY --from=build /opt/pgscout /opt/pgscout
COPY config/pgscout.yaml /etc/pgscout/pgscout.yaml
ENV PATH=/opt/pgscout/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PGSCOUT_PROXY_LISTEN=0.0.0.0:6432 \
    PGSCOUT_ADMIN_LISTEN=0.0.0.0:9187
# Outside a container pgscout binds loopback only. Inside one, loopback is unreachable from the
# other containers and from the kubelet's probes, so both listeners bind every interface here;
# a sidecar that shares the application's network namespace sets PGSCOUT_PROXY_LISTEN back to
# 127.0.0.1:6432 (see deploy/). Set PGSCOUT_ADMIN_TOKEN when the admin port is reachable by others.
USER 10001
EXPOSE 6432 9187
# No curl in the slim image: the interpreter that runs pgscout does the probe.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9187/healthz', timeout=2)"]
ENTRYPOINT ["pgscout"]
CMD ["run", "-c", "/etc/pgscout/pgscout.yaml"]
