# A small runtime image with the `idem` and `idem-fake-vendor` binaries.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bins

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/idem /src/target/release/idem-fake-vendor /usr/local/bin/
COPY connectors /etc/idem/connectors
COPY idem.toml /etc/idem/idem.toml
WORKDIR /etc/idem
ENTRYPOINT ["idem"]
