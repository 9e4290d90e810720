# One image for both entry points of aqueduct:
#   aqueduct-serve     the serving pod (default command, port 8080)
#   aqueduct-operator  the Pipeline operator (the Helm chart sets this command)
#   aqueduct-fetch     downloads a Pipeline's model (storageUri) in the serving pod's init container
#
# Build from another base (e.g. on a machine without a registry, see scripts/ci/base-image.sh):
#   DOCKER_BUILDKIT=0 docker build --network host --build-arg BASE=local/python:3.11-bookworm -t aqueduct:dev .
ARG BASE=python:3.11-slim

# ---- build: a virtualenv at /opt/venv holding the runtime dependencies -----------------------------
FROM ${BASE} AS build
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PIP_INDEX_URL=${PIP_INDEX_URL} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
# /opt/build holds the build tools (pip, hatchling); /opt/venv gets no pip at all and is all that ships.
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --quiet "hatchling==1.33.0" \
 && python -m venv --without-pip /opt/venv
WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml changes.
# Empty stand-ins for the packages let hatchling build a wheel that carries the real dependency metadata;
# the stand-in itself is uninstalled again, its dependencies stay.
COPY pyproject.toml ./
RUN mkdir -p aqueduct service/aqueduct_service operator/aqueduct_operator \
 && touch README.md aqueduct/__init__.py service/aqueduct_service/__init__.py operator/aqueduct_operator/__init__.py \
 && /opt/build/bin/pip wheel --quiet --no-deps --no-build-isolation --wheel-dir /tmp/deps . \
 && set -- /tmp/deps/*.whl \
 && /opt/build/bin/pip --python /opt/venv/bin/python install --quiet "$1[service,operator]" \
 && /opt/build/bin/pip --python /opt/venv/bin/python uninstall --quiet --yes aqueduct-serving \
 && rm -rf /tmp/deps /src/*

# ---- project: the project alone, laid out as an overlay of /opt/venv (a small layer of its own) ---------
FROM build AS project
# No network needed from here on.
COPY pyproject.toml README.md* ./
COPY aqueduct/ aqueduct/
COPY service/ service/
COPY operator/ operator/
RUN touch README.md \
 && /opt/build/bin/pip wheel --quiet --no-deps --no-build-isolation --wheel-dir /tmp/dist . \
 && /opt/build/bin/pip --python /opt/venv/bin/python install --quiet --no-deps --no-warn-script-location \
      --prefix /opt/project /tmp/dist/*.whl

# ---- runtime: the base, a non-root user, the venv and the examples; no pip, compilers or build tools ---
FROM ${BASE}
# kopf (getpass.getuser) needs a passwd entry for the uid it runs as.
RUN groupadd --gid 10001 aqueduct \
 && useradd --no-log-init --uid 10001 --gid 10001 --home-dir /app --no-create-home \
      --shell /usr/sbin/nologin aqueduct
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/app \
    USER=aqueduct
# Dependencies (rebuilt only when pyproject.toml changes), then the project over them.
COPY --from=build /opt/venv /opt/venv
COPY --from=project /opt/project /opt/venv
WORKDIR /app
COPY examples/ examples/
USER 10001
EXPOSE 8080
CMD ["aqueduct-serve", "--config", "examples/catdetector/pipeline.yaml"]
