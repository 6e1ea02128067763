#!/usr/bin/env bash
# CPU per connection of PgBouncer and of one or more pgha-proxy binaries
# (an A/B of two builds, say) in a connect-per-transaction storm, side by
# side on one PostgreSQL, round after round:
#
#   ./scripts/storm-ab.sh target/release/pgha-proxy /tmp/pgha-proxy-before
#
# Each round runs `pgbench -n -S -C -c 400 -j 2 -T $SECS` against PgBouncer
# (transaction mode, pool 32) and then each proxy (transaction mode, pool
# 32), and prints total/user CPU microseconds per transaction of the
# pooler's process, read from /proc (utime, stime). ROUNDS (default 5)
# and SECS (default 8) set the length. Runs as root (the servers run as
# the postgres user); everything lives in a temporary directory removed
# at the end. Needs pgbouncer and PostgreSQL 15 from Debian.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 PROXY_BINARY..." >&2; exit 2; }
rounds=${ROUNDS:-5}
secs=${SECS:-8}
. "$(dirname "$0")/poolers-common.sh"
poolers_init pgha-storm-ab

names=(pgbouncer) ports=()
port=$(free_port)
write_pgbouncer_ini "$port"
"${as_pg[@]}" /usr/sbin/pgbouncer "$dir/pgbouncer.ini" >"$dir/pgbouncer.log" 2>&1 &
pids+=($!) ports+=("$port")
i=0
for proxy in "$@"; do
  i=$((i + 1))
  port=$(free_port)
  write_proxy_toml "$dir/proxy$i.toml" "ab$i" "$port"
  "${as_pg[@]}" "$(realpath "$proxy")" --config "$dir/proxy$i.toml" >"$dir/proxy$i.log" 2>&1 &
  pids+=($!) ports+=("$port") names+=("proxy$i")
done
for port in "${ports[@]}"; do
  wait_ready "$port"
done
i=0
for proxy in "$@"; do i=$((i + 1)); echo "proxy$i: $proxy"; done
echo "CPU µs per transaction of each pooler's process, total/user"
ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15, $14}' "/proc/$1/stat"; }
for r in $(seq "$rounds"); do
  line="round $r:"
  for k in "${!names[@]}"; do
    read -r c0 u0 < <(cpu "${pids[$k]}")
    out=$(pgbench -n -S -M simple -C -c 400 -j 2 -T "$secs" -h 127.0.0.1 -p "${ports[$k]}" -U postgres postgres 2>&1)
    read -r c1 u1 < <(cpu "${pids[$k]}")
    tx=$(echo "$out" | awk '/actually processed/ {print $NF}')
    line+=" ${names[$k]} $(python3 -c "t=1e6/$ticks/$tx; print(f'{($c1-$c0)*t:.1f}/{($u1-$u0)*t:.1f}')")"
  done
  echo "$line"
done
