# The soda-syncer node agent image. Build from the repository root:
#   docker build -t soda-syncer:latest .
# (This Dockerfile was written without Docker at hand and has not been built
# yet; crates/agent/tests/it/deploy.rs checks its structure only.)

# Build stage: the release binary of the soda-syncer package.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
RUN cargo build --release --locked -p soda-syncer

# Runtime: Debian 12, the same restic (0.14.0) the agent is tested with.
#   restic           the backup engine the agent drives
#   ca-certificates  TLS to object stores and the API server
#   btrfs-progs      the btrfs consistency mode (btrfs subvolume snapshot/delete)
#   xfsprogs         xfs_info, xfs_freeze for diagnosing reflink/blockclone
#                    volumes in the pod (the agent itself uses the ioctls)
#   util-linux       fsfreeze, findmnt and friends, for the same
#   mount            mount, umount and losetup (blockclone mode)
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends restic ca-certificates btrfs-progs xfsprogs util-linux mount \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/soda-syncer /usr/local/bin/soda-syncer
# The agent's API and the legacy POST /snapshot (soda-proxy's port).
EXPOSE 50030
# Root: reading every file of every volume; the DaemonSet drops every
# capability but the few it explains.
ENTRYPOINT ["/usr/local/bin/soda-syncer", "serve"]
