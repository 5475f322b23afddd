# syntax=docker/dockerfile:1
# The three binaries in one small image; pick one with --target (relay is the default):
#   docker build -t portcullis-relay .
#   docker build --target connector -t portcullis-connector .
#   docker build --target agent -t portcullis .
# The runtime runs as an unprivileged user (10001), writes only where a volume is mounted
# (state directories), and works with a read-only root filesystem.

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
      -p portcullis-relay -p portcullis-connector -p portcullis \
 && mkdir /out \
 && cp target/release/portcullis-relay target/release/portcullis-connector \
       target/release/portcullis /out/

FROM debian:bookworm-slim AS runtime
# CA roots for https:// origins; nothing else: the binaries need only libc and libgcc.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 portcullis \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/portcullis \
      --shell /usr/sbin/nologin portcullis \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/portcullis /var/lib/portcullis-connector
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
# Logs as JSON lines on stderr for the cluster's log pipeline.
ENV PORTCULLIS_LOG_FORMAT=json

FROM runtime AS agent
ENTRYPOINT ["/usr/local/bin/portcullis"]

FROM runtime AS connector
VOLUME ["/var/lib/portcullis-connector"]
ENTRYPOINT ["/usr/local/bin/portcullis-connector"]
CMD ["run", "--config", "/etc/portcullis/connector.toml"]

FROM runtime AS relay
VOLUME ["/var/lib/portcullis"]
# QUIC (UDP), HTTPS (TCP) and the admin listener; a Service maps 443 to both.
EXPOSE 4433/udp 8443/tcp 9090/tcp
ENTRYPOINT ["/usr/local/bin/portcullis-relay"]
CMD ["run", "--config", "/etc/portcullis/relay.toml"]
