# pgscout: the PostgreSQL sidecar proxy as a container image.
#
# Build from the repository root:   docker build -t pgscout .      (podman: add --format docker,
#                                                                  or HEALTHCHECK is dropped)
# Run beside an application:        docker run -e PGSCOUT_PROXY_UPSTREAM=postgresql://db:5432/app pgscout
#
# The base is Debian 12 with Debian's own python3, so the image builds from any bookworm base
# (the official debian:bookworm-slim, or one made with debootstrap where no registry is reachable,
# as tests/test_container.py does). The install step is the same `pip install .` of this
# repository that .ci/run performs (without the test extras), so the image runs what CI tested.
# asyncpg, uvloop and pglast ship manylinux wheels; gcc in the build stage compiles pgscout's own
# hot path with mypyc (setup.py) and stays out of the final image.
#
# A host that reaches PyPI only through its own CA bundle or pip settings passes them for the
# build only, never into a layer:
#   docker build --secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt \
#                --secret id=pip.conf,src=/etc/pip.conf -t pgscout .

FROM debian:bookworm-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/pgscout
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
# pip reads PIP_CONFIG_FILE and PIP_CERT only when the build was given them (see above).
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip.conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip.conf; fi; \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi; \
    /opt/pgscout/bin/python3 -m pip install .
# From /, not /src: there ./proxy is not on the path, so the installed package is what imports.
# The compiled decoder is the point of the gcc above: a silent fallback to .py fails the build.
RUN cd / && /opt/pgscout/bin/python3 -c "import uvloop, pglast, asyncpg, pgscout.dataplane.decoder as d; assert d.__file__.endswith('.so'), d.__file__"

FROM debian:bookworm-slim
LABEL org.opencontainers.image.title="pgscout" \
      org.opencontainers.image.description="Transparent PostgreSQL sidecar: statement fingerprints, slow-query log, N+1 detection, connection budgets" \
      org.opencontainers.image.licenses="Apache-2.0"
# The interpreter the venv was made with; nothing else (no compiler, no pip cache, no apt lists).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin pgscout
COPY --from=build /opt/pgscout /opt/pgscout
COPY config/pgscout.yaml /etc/pgscout/pgscout.yaml
ENV PATH=/opt/pgscout/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PGSCOUT_PROXY_LISTEN=0.0.0.0:6434 \
    PGSCOUT_ADMIN_LISTEN=0.0.0.0:9434
# Outside a container pgscout binds loopback only. Inside one, loopback is unreachable from the
# other containers and from the kubelet's probes, so both listeners bind every interface here
# (pgscout warns at start while the admin port has no token: set PGSCOUT_ADMIN_TOKEN); a sidecar
# that shares the application's network namespace sets PGSCOUT_PROXY_LISTEN back to
# 127.0.0.1:6434 (see deploy/).
USER 10001
EXPOSE 6434 9434
# No curl in the image: the interpreter that runs pgscout probes the port that PGSCOUT_ADMIN_LISTEN
# names, so a container started with another admin address is still probed where it listens.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; port = os.environ['PGSCOUT_ADMIN_LISTEN'].rsplit(':', 1)[1]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]
ENTRYPOINT ["pgscout"]
CMD ["run", "-c", "/etc/pgscout/pgscout.yaml"]
