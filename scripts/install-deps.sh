#!/usr/bin/env bash
# Installs the system packages pgha needs on Debian bookworm, and only those that
# are missing. Idempotent: a second run installs nothing and says so.
# Used by the README quick start, by .ci/run and by the images.
set -euo pipefail

# package -> why we need it
PACKAGES=(
  postgresql-15          # the database server (initdb, postgres, pg_rewind, pg_basebackup)
  postgresql-client-15   # psql, pgbench
  etcd-server            # the DCS
  etcd-client            # etcdctl, used by tests and operators
  pgbackrest             # backups and WAL archive
  pgbouncer              # the peer pooler for benchmarks
  patroni                # the peer orchestrator for the failover benchmark
  protobuf-compiler      # protoc: etcd-client's build needs it
  libprotobuf-dev        # google/protobuf/*.proto includes for that build
  build-essential        # cc for crates that build C
  pkg-config
  procps                 # ps/pgrep for process checks
  iproute2               # network namespaces for partition tests
  iptables               # pgha_local::Blackhole: peers that vanish, in the proxy's network tests
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "install-deps: not root and no sudo; run as root: $0" >&2; exit 1
  fi
fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages already installed, nothing to do"
else
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # The Debian postgresql package would create and start a 'main' cluster on
  # port 5432; pgha runs its own clusters, so keep the package from doing that.
  if [ ! -e /etc/postgresql-common/createcluster.conf ] || ! grep -q '^create_main_cluster = false' /etc/postgresql-common/createcluster.conf 2>/dev/null; then
    $SUDO mkdir -p /etc/postgresql-common
    echo 'create_main_cluster = false' | $SUDO tee -a /etc/postgresql-common/createcluster.conf >/dev/null
  fi
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  echo "install-deps: installed ${missing[*]}"
fi

# Debian's etcd-server and pgbouncer packages start system services; pgha's tests
# and `pgha up` start their own instances on free ports, so the system ones only
# take resources and fixed ports. Stop them if they run (no-op in containers).
for svc in etcd pgbouncer; do
  if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
    $SUDO systemctl stop "$svc" && $SUDO systemctl disable "$svc" >/dev/null 2>&1 || true
    echo "install-deps: stopped the system $svc service (pgha starts its own)"
  fi
done

# The Rust toolchain is expected on PATH (rustup); cargo-nextest runs the tests.
if ! command -v cargo >/dev/null; then
  echo "install-deps: cargo not found: install Rust with rustup (https://rustup.rs)" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "install-deps: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
