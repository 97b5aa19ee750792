# mqfleet: one image for the agent, the collector and the CLI.
#
#   docker build -t mqfleet .
#   docker run --rm mqfleet --help
#
# Build stage makes wheels (psycopg for PostgreSQL included); the runtime stage has no
# compiler, no pip cache and runs as an unprivileged user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[postgres]'

FROM python:3.11-slim
ARG UID=10001
# Data (SQLite database, agent state) lives under /var/lib/mqfleet: mount a volume there.
RUN useradd --system --uid "${UID}" --user-group --home-dir /var/lib/mqfleet \
        --create-home --shell /usr/sbin/nologin mqfleet
# Mount points for compose.yaml's operator-key (0700: the private key) and operator-pub
# volumes: a fresh named volume takes the owner and mode of the directory it covers.
RUN install -d -o mqfleet -g mqfleet -m 0700 /etc/mqfleet/key \
    && install -d -o mqfleet -g mqfleet -m 0755 /etc/mqfleet/pub
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels 'mqfleet[postgres]'
ENV XDG_DATA_HOME=/var/lib/mqfleet \
    XDG_CONFIG_HOME=/var/lib/mqfleet/config \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER mqfleet
WORKDIR /var/lib/mqfleet
VOLUME ["/var/lib/mqfleet"]
# mqfleet turns SIGTERM into a clean shutdown (the agent publishes "offline" first).
STOPSIGNAL SIGTERM
ENTRYPOINT ["mqfleet"]
CMD ["--help"]
