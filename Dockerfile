# ambasync: mirror Allen ISH expression grids into MINC. Build: docker build -t ambasync .
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AMBASYNC_CONFIG=/etc/ambasync/config.toml

WORKDIR /opt/ambasync

# System packages through the same script CI uses (libminc-dev for pyminc, minc-tools for mincinfo).
COPY scripts/install.sh scripts/install.sh
RUN bash scripts/install.sh --system-only \
    && rm -rf /var/lib/apt/lists/*

# The project itself, non-editable; the script's system step is a no-op now.
COPY pyproject.toml README.md config.toml ./
COPY ambasync/ ambasync/
RUN bash scripts/install.sh --no-dev \
    && mkdir -p /etc/ambasync /data \
    && cp config.toml /etc/ambasync/config.toml \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin ambasync \
    && chown ambasync /data

VOLUME ["/data"]
WORKDIR /data
USER 10001

ENTRYPOINT ["python", "-m", "ambasync"]
CMD ["run", "--out", "/data"]
