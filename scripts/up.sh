#!/usr/bin/env bash
# Quick start: install what is missing, build pgha, and run `pgha up` (a
# whole HA cluster on this machine: etcd, PostgreSQL nodes with their agents,
# and the proxy). Arguments are passed to `pgha up` (see `pgha up --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
./scripts/install-deps.sh
cargo build --release --workspace --bins
exec target/release/pgha up "$@"
