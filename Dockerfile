# A small runtime image with the `idem` binary alone, running as an unprivileged user
# (the default target). The `fake-vendor` target holds the test double that
# docker-compose.yml runs beside it; it is never part of the idem image.
# (scripts/image.sh builds an equivalent FROM scratch image offline.)
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --workspace --bins

FROM debian:bookworm-slim AS fake-vendor
COPY --from=build /src/target/release/idem-fake-vendor /usr/local/bin/
USER 10001:10001
ENTRYPOINT ["idem-fake-vendor"]

FROM debian:bookworm-slim AS idem
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 idem \
    && useradd --system --uid 10001 --gid idem --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin idem
COPY --from=build /src/target/release/idem /usr/local/bin/
COPY connectors /etc/idem/connectors
COPY idem.toml /etc/idem/idem.toml
WORKDIR /etc/idem
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# `idem serve` listens here for /healthz, /readyz, /metrics and the console.
EXPOSE 9464
ENTRYPOINT ["idem"]
