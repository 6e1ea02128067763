#!/usr/bin/env bash
# Builds pgha-proxy with profile-guided optimisation (PGO), the build to run
# in production and to benchmark:
#
#   ./scripts/build-proxy-pgo.sh      # -> target/pgo/use/release/pgha-proxy
#
# 1. builds an instrumented proxy (rustc -Cprofile-generate);
# 2. runs it on a scratch PostgreSQL 15 under pgbench -S: a connect-per-
#    transaction storm and 32 clients in each -M mode in transaction mode,
#    simple in session mode, and a storm of SCRAM logins over TLS (see
#    poolers-common.sh);
# 3. merges the profile (llvm-profdata, Debian's llvm-19, installed when
#    missing; it reads the raw profiles of rustc 1.95, whose LLVM is 22:
#    a toolchain with a newer raw format needs a newer llvm-profdata) and
#    builds the proxy again with it (-Cprofile-use).
# The compiler then lays out the code a client runs (accept, login,
# forwarding) together, hot paths straight and cold ones aside: fewer
# instructions and instruction-cache misses per connection than the plain
# release build (see proxy/README.md, Benchmark). Both builds keep target
# directories of their own under target/pgo, so the plain build's cache
# stays. Runs as root (the servers run as the postgres user); about ten
# minutes on two cores. SECS (default 5) sets each training run's length.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
out=$PWD/target/pgo
secs=${SECS:-5}

profdata=$(command -v llvm-profdata-19 || true)
if [ -z "$profdata" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q llvm-19 >/dev/null ||
    { apt-get update -q >/dev/null && apt-get install -y -q llvm-19 >/dev/null; }
  profdata=$(command -v llvm-profdata-19)
fi

mkdir -p "$out"
RUSTFLAGS="-Cprofile-generate=$out/profiles" \
  cargo build --release -p pgha-proxy --target-dir "$out/gen"
# What the instrumented build scripts wrote while building.
rm -rf "$out/profiles"

. scripts/poolers-common.sh
poolers_init pgha-pgo
# The proxy runs as the postgres user, which may not reach into this
# checkout (under /root, say): it runs from the scratch directory and
# writes its profiles there.
cp "$out/gen/release/pgha-proxy" "$dir/pgha-proxy-instrumented"
mkdir "$dir/profiles"
chown postgres "$dir/pgha-proxy-instrumented" "$dir/profiles"
# SCRAM and TLS logins are trained too: code the profile never saw is
# optimised for size, not speed.
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
  -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
echo '"postgres" "pgo-training"' >"$dir/proxy-users.txt"
chown postgres "$dir/key.pem" "$dir/cert.pem" "$dir/proxy-users.txt"
# train MODE LOGIN PGBENCH_ARGS...: LOGIN is trust, or scram-tls.
train() {
  local mode=$1 login=$2 port pid
  shift 2
  port=$(free_port)
  write_proxy_toml "$dir/proxy.toml" pgo "$port"
  sed -i "s/^pool_mode = .*/pool_mode = \"$mode\"/" "$dir/proxy.toml"
  if [ "$login" = scram-tls ]; then
    sed -i -e 's/^auth_method = .*/auth_method = "scram-sha-256"/' \
      -e "/^auth_method/a users_file = \"$dir/proxy-users.txt\"\ntls_cert_file = \"$dir/cert.pem\"\ntls_key_file = \"$dir/key.pem\"" \
      "$dir/proxy.toml"
  fi
  LLVM_PROFILE_FILE="$dir/profiles/%m_%p.profraw" "${as_pg[@]}" "$dir/pgha-proxy-instrumented" \
    --config "$dir/proxy.toml" >>"$dir/proxy.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  wait_ready "$port"
  for args in "$@"; do
    # shellcheck disable=SC2086
    pgbench -n -S $args -j 2 -T "$secs" -h 127.0.0.1 -p "$port" -U postgres postgres >"$dir/pgbench.log" 2>&1 ||
      { cat "$dir/pgbench.log" "$dir/proxy.log" >&2; exit 1; }
    echo "pgo training, $mode $args: $(grep -m1 '^tps' "$dir/pgbench.log")"
  done
  # SIGTERM: the proxy drains and exits, writing its profile.
  kill -TERM "$pid"
  wait "$pid"
  pids=()
}
train transaction trust "-M simple -C -c 100" "-M simple -c 32" "-M extended -c 32" "-M prepared -c 32"
train session trust "-M simple -c 32"
PGPASSWORD=pgo-training PGSSLMODE=require train transaction scram-tls "-M extended -C -c 32"

"$profdata" merge -o "$out/proxy.profdata" "$dir"/profiles/*.profraw
# Training is over: the scratch PostgreSQL stops before the second build.
poolers_cleanup
trap - EXIT
# Cargo does not look at the profile's contents: named after them, a new
# profile is a new RUSTFLAGS, and every crate is built again with it.
profile=$out/proxy-$(sha256sum "$out/proxy.profdata" | cut -c1-16).profdata
rm -f "$out"/proxy-*.profdata
mv "$out/proxy.profdata" "$profile"
RUSTFLAGS="-Cprofile-use=$profile" \
  cargo build --release -p pgha-proxy --target-dir "$out/use"
echo "built $out/use/release/pgha-proxy"
