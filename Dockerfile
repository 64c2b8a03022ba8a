# The soda-syncer node agent image. Build from the repository root:
#   docker build -t soda-syncer:latest .
# Without Docker or a registry, scripts/image builds the same image from
# Debian packages (mmdebstrap) and podman; crates/agent/tests/it/image.rs
# builds that one and runs it as the chart's DaemonSet. No Docker was at
# hand here: deploy.rs checks this file's structure and that its package
# list is scripts/image's.

# Build stage: the release binary of the soda-syncer package. Debian 12's
# glibc (2.36) is older than the runtime's (2.41), so the binary runs there.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
RUN cargo build --release --locked -p soda-syncer

# Runtime: Debian 13 (trixie), restic 0.18 from Debian (the agent prints
# both versions at start). The same packages as scripts/image:
#   restic           the backup engine the agent drives
#   ca-certificates  TLS to object stores and the API server
#   btrfs-progs      the btrfs consistency mode (btrfs subvolume snapshot/delete)
#   xfsprogs         xfs_info, xfs_freeze for diagnosing reflink/blockclone
#                    volumes in the pod (the agent itself uses the ioctls)
#   util-linux       fsfreeze, findmnt and friends, for the same
#   mount            mount, umount and losetup (blockclone mode)
FROM debian:trixie-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends restic ca-certificates btrfs-progs xfsprogs util-linux mount \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/soda-syncer /usr/local/bin/soda-syncer
# The agent's API and the legacy POST /snapshot (soda-proxy's port).
EXPOSE 50030
# Root: reading every file of every volume; the DaemonSet drops every
# capability but the few it explains.
ENTRYPOINT ["/usr/local/bin/soda-syncer", "serve"]
