# syntax=docker/dockerfile:1
#
# dora-reconciler image: `dora-reconciler run --config /etc/dora-reconciler/config.yaml` by default.
#
#   docker build -t ghcr.io/your-org/dora-reconciler:0.1.0 .
#   docker run --rm --read-only --tmpfs /tmp --tmpfs /var/lib/dora-reconciler \
#     -v "$PWD/config.yaml:/etc/dora-reconciler/config.yaml:ro" -e GITHUB_TOKEN -e DEVLAKE_KEY_GLOBAL \
#     ghcr.io/your-org/dora-reconciler:0.1.0 check --config /etc/dora-reconciler/config.yaml
#
# Built from the repository alone (pyproject.toml, README.md, reconciler/); .dockerignore keeps
# everything else out of the build context. Runs as uid/gid 10001 with a read-only root filesystem:
# the only writable paths it needs are /tmp (HOME) and the working directory /var/lib/dora-reconciler,
# where the embedded SQLite default (./.dora-reconciler/) would live. The Kubernetes manifests in
# cronjob/ mount an emptyDir on both.

# Same base in both stages: the venv's interpreter is a symlink to /usr/local/bin/python3.11.
# Pinned to Python 3.11 on Debian bookworm; pin a digest (python:3.11-slim-bookworm@sha256:...) for
# reproducible builds and let your dependency bot bump it.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: build the wheel and install it with its dependencies into /opt/venv --------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
RUN python -m venv /opt/venv

COPY pyproject.toml README.md ./
COPY reconciler/ ./reconciler/

# pip compiles the .pyc files at install time, so the read-only image never needs to write them.
# pip and setuptools are removed from the runtime venv: nothing installs packages at run time.
# The last line fails the build if the console script or an import is broken.
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/python -m pip install /wheels/*.whl \
 && /opt/venv/bin/python -m pip uninstall --yes pip setuptools \
 && /opt/venv/bin/dora-reconciler --help > /dev/null

# --- runtime ------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="dora-reconciler" \
      org.opencontainers.image.description="Turns Argo CD deployments into Apache DevLake deployment records for DORA metrics" \
      org.opencontainers.image.licenses="Apache-2.0"

# A system user with no login shell and no home directory; HOME points at the /tmp mount instead.
RUN groupadd --system --gid 10001 dora-reconciler \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin dora-reconciler \
 && install --directory --owner=10001 --group=10001 --mode=0700 /var/lib/dora-reconciler

COPY --from=builder /opt/venv /opt/venv

ENV PATH="/opt/venv/bin:${PATH}" \
    VIRTUAL_ENV=/opt/venv \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Relative paths (the SQLite default ./.dora-reconciler/, sqlite:///relative.db) resolve here.
WORKDIR /var/lib/dora-reconciler

# Numeric, so Kubernetes can verify runAsNonRoot without reading /etc/passwd.
USER 10001:10001

ENTRYPOINT ["dora-reconciler"]
CMD ["run", "--config", "/etc/dora-reconciler/config.yaml"]
