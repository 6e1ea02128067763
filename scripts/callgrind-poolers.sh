#!/usr/bin/env bash
# User-space instructions per transaction of pgha-proxy and PgBouncer, under
# callgrind: deterministic where timings on a shared machine are not.
#
#   ./scripts/callgrind-poolers.sh [simple|extended|storm]
#
# Starts a scratch PostgreSQL 15 (pgbench scale 10), then for each pooler
# (transaction mode, pool size 32) runs pgbench -S twice under valgrind
# (--tool=callgrind) with 32 clients (storm: 8 clients, -C) and reports the
# difference between the two runs per extra transaction, so start-up costs
# cancel out. Needs a release build (cargo build --release -p pgha-proxy),
# valgrind, pgbouncer and PostgreSQL 15 from Debian; runs as root (the
# servers run as the postgres user). Everything lives in a temporary
# directory removed at the end. With CG_KEEP=DIR, the long run's callgrind
# profile of each pooler is kept as DIR/<pooler>.cg for callgrind_annotate.
# PROXY=PATH measures another build (default target/release/pgha-proxy;
# scripts/build-proxy-pgo.sh's is target/pgo/use/release/pgha-proxy).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-simple}
proxy=${PROXY:-$PWD/target/release/pgha-proxy}
[ -x "$proxy" ] || { echo "build first: cargo build --release -p pgha-proxy (or set PROXY)" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }

. scripts/poolers-common.sh
poolers_init pgha-callgrind
bouncer_port=$(free_port); rw=$(free_port)
write_pgbouncer_ini "$bouncer_port"
write_proxy_toml "$dir/proxy.toml" callgrind "$rw"
chown -R postgres "$dir"

case $mode in
  simple | extended) clients=32; short=500; long=1500; args=(-M "$mode") ;;
  storm) clients=8; short=100; long=700; args=(-M simple -C) ;;
  *) echo "mode: simple, extended or storm" >&2; exit 2 ;;
esac

# Instructions the pooler ran while pgbench did `tx` transactions per client.
measure() {
  local who=$1 port=$2 tx=$3 pid out
  shift 3
  rm -f "$dir"/cg.out.*
  "${as_pg[@]}" valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out.%p" "$@" \
    >"$dir/$who.log" 2>&1 &
  pid=$!
  wait_ready "$port" 150
  pgbench -n -S "${args[@]}" -c "$clients" -j 1 -t "$tx" -h 127.0.0.1 -p "$port" -U postgres postgres \
    >"$dir/pgbench.log" 2>&1 || { cat "$dir/pgbench.log" >&2; exit 1; }
  kill -INT "$pid"; wait "$pid" || true
  out=$(ls "$dir"/cg.out.* | head -1)
  if [ -n "${CG_KEEP:-}" ]; then mkdir -p "$CG_KEEP"; cp "$out" "$CG_KEEP/$who.cg"; fi
  # The Prometheus exporter calibrates a clock once at start for a fixed
  # time: under valgrind its instruction count follows the machine's load,
  # so it is left out of pgha-proxy's total (PgBouncer has no such call).
  local total calib
  total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  calib=$(callgrind_annotate --inclusive=yes "$out" 2>/dev/null |
    awk '/PrometheusBuilder::build_recorder/ {gsub(",", "", $1); print $1; exit}')
  echo $((total - ${calib:-0}))
}

echo "pgbench -S $mode, $clients clients; user-space instructions per transaction (callgrind)"
for who in pgbouncer pgha-proxy; do
  if [ "$who" = pgbouncer ]; then cmd=(/usr/sbin/pgbouncer "$dir/pgbouncer.ini"); port=$bouncer_port
  else cmd=("$proxy" --config "$dir/proxy.toml"); port=$rw; fi
  a=$(measure "$who" "$port" "$short" "${cmd[@]}")
  b=$(measure "$who" "$port" "$long" "${cmd[@]}")
  echo "$who: $(( (b - a) / (clients * (long - short)) ))"
done
