# The images of aqueduct, from one Dockerfile; RUNTIME picks which:
#   docker build -t aqueduct .                                      the base: aqueduct-serve (handler steps),
#                                                                   aqueduct-operator, aqueduct-fetch
#   docker build --build-arg RUNTIME=onnx    -t aqueduct-onnx .     + onnxruntime        (steps with runtime: onnx)
#   docker build --build-arg RUNTIME=torch   -t aqueduct-torch .    + torch, CPU build   (runtime: torch)
#   docker build --build-arg RUNTIME=sklearn -t aqueduct-sklearn .  + scikit-learn, skops, xgboost, lightgbm
#                                                                   (runtime: sklearn, xgboost, lightgbm)
# RUNTIME names an extra of pyproject.toml, where the versions are pinned; the image holds the project's
# `.[service,operator,RUNTIME]`. All four share their first layers (the base, the user, the dependencies in
# /opt/venv); the runtime's packages come next, then the project and the examples (small, rebuilt on a code change).
#
# Build from another base (e.g. on a machine without a registry, see scripts/ci/base-image.sh):
#   DOCKER_BUILDKIT=0 docker build --network host --build-arg BASE=local/python:3.11-bookworm -t aqueduct:dev .
#
# CUDA (documented, not built by CI):
#   torch: PyPI's torch wheels are CUDA builds that bring their CUDA libraries along (several GB), so the base can
#     stay python:3.11-slim: --build-arg RUNTIME=torch --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
#     (or TORCH_INDEX_URL= for PyPI's build). The node needs the NVIDIA driver and container toolkit.
#   onnx: onnxruntime-gpu (same version as the onnx extra's onnxruntime) on a base with CUDA 12 and cuDNN 9, e.g.
#     nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 with python3, python3-venv and python-is-python3 installed:
#     build aqueduct-onnx with --build-arg BASE=<that image>, then FROM it: uninstall onnxruntime and install
#     onnxruntime-gpu (pip --python /opt/venv/bin/python, as in examples/custom-image/Dockerfile).
ARG BASE=python:3.11-slim

# ---- build: a virtualenv at /opt/venv holding the dependencies every image has ------------------------------
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
# Empty stand-ins for the packages let hatchling build a wheel (kept in /opt/deps) that carries the real
# dependency metadata; the stand-in itself is uninstalled again, its dependencies stay.
COPY pyproject.toml ./
RUN mkdir -p aqueduct service/aqueduct_service operator/aqueduct_operator \
 && touch README.md aqueduct/__init__.py service/aqueduct_service/__init__.py operator/aqueduct_operator/__init__.py \
 && /opt/build/bin/pip wheel --quiet --no-deps --no-build-isolation --wheel-dir /opt/deps . \
 && set -- /opt/deps/*.whl \
 && /opt/build/bin/pip --python /opt/venv/bin/python install --quiet "$1[service,operator]" \
 && /opt/build/bin/pip --python /opt/venv/bin/python uninstall --quiet --yes aqueduct-serving \
 && rm -rf /src/*

# ---- runtime: the runtime's packages alone, laid out as an overlay of /opt/venv (empty without RUNTIME) ------
FROM build AS runtime
ARG RUNTIME=
# Where torch comes from (RUNTIME=torch only): PyPI's torch is the CUDA build; this index has the CPU build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# pip sees what /opt/venv holds and installs only what is missing into /opt/runtime. The stand-in is removed
# again (the project layer brings the real one), and a runtime that would need another version of a package
# /opt/venv already holds fails the build instead of laying two versions over each other.
RUN mkdir -p /opt/runtime \
 && if [ -n "$RUNTIME" ]; then \
      if [ "$RUNTIME" = torch ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi \
      && set -- /opt/deps/*.whl \
      && /opt/build/bin/pip --python /opt/venv/bin/python install --quiet --no-warn-script-location \
           --prefix /opt/runtime "$1[service,operator,$RUNTIME]" \
      && site="$(echo /opt/runtime/lib/python3*/site-packages)" \
      && rm -rf "$site"/aqueduct "$site"/aqueduct_service "$site"/aqueduct_operator \
           "$site"/aqueduct_serving-*.dist-info /opt/runtime/bin/aqueduct-* \
      && for dist in "$site"/*.dist-info; do \
           name="${dist##*/}"; \
           for held in /opt/venv/lib/python3*/site-packages/"${name%%-*}"-*.dist-info; do \
             if [ -e "$held" ]; then echo "RUNTIME=$RUNTIME needs $name over ${held##*/}" >&2; exit 1; fi; \
           done; \
         done; \
    fi

# ---- project: the project alone, laid out as an overlay of /opt/venv (a small layer of its own) ---------------
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

# ---- the image: the base, a non-root user, the venv and the examples; no pip, compilers or build tools --------
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
# Dependencies (rebuilt only when pyproject.toml changes): the same layer in every image.
COPY --from=build /opt/venv /opt/venv
# Declared here, not above: the layers before it are then the same in every image.
ARG RUNTIME=
# LightGBM's wheel links the system's OpenMP runtime (libgomp1), which slim bases lack; the version is the base's.
# hadolint ignore=DL3008
RUN if [ "$RUNTIME" = sklearn ]; then \
      apt-get update && apt-get install -y --no-install-recommends libgomp1 \
      && apt-get clean && rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log; \
    fi
# The runtime's packages, then the project over them.
COPY --from=runtime /opt/runtime /opt/venv
COPY --from=project /opt/project /opt/venv
WORKDIR /app
COPY examples/ examples/
USER 10001
EXPOSE 8080 8081
CMD ["aqueduct-serve", "--config", "examples/catdetector/pipeline.yaml"]
