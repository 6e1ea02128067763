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
dir=$(mktemp -d /tmp/pgha-storm-ab.XXXXXX)
chown postgres "$dir"
bin=/usr/lib/postgresql/15/bin
as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

pg_port=$(free_port)
"${as_pg[@]}" "$bin/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
cat >>"$dir/data/postgresql.conf" <<EOF
port = $pg_port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
max_connections = 200
shared_buffers = 256MB
fsync = off
EOF
"${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/pg.log" -w start >/dev/null
pgbench -i -q -s 10 -h 127.0.0.1 -p "$pg_port" -U postgres postgres >/dev/null 2>&1

names=(pgbouncer) ports=() 
port=$(free_port)
cat >"$dir/pgbouncer.ini" <<EOF
[databases]
postgres = host=127.0.0.1 port=$pg_port dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $dir/users.txt
pool_mode = transaction
default_pool_size = 32
max_client_conn = 20000
logfile =
pidfile =
log_connections = 0
log_disconnections = 0
EOF
echo '"postgres" ""' >"$dir/users.txt"
chown -R postgres "$dir"
"${as_pg[@]}" /usr/sbin/pgbouncer "$dir/pgbouncer.ini" >"$dir/pgbouncer.log" 2>&1 &
pids+=($!) ports+=("$port")
i=0
for proxy in "$@"; do
  i=$((i + 1))
  port=$(free_port)
  cat >"$dir/proxy$i.toml" <<EOF
id = "ab$i"
listen_rw = "127.0.0.1:$port"
listen_ro = "127.0.0.1:$(free_port)"
listen_admin = "127.0.0.1:$(free_port)"
pool_mode = "transaction"
pool_size = 32
auth_method = "trust"
max_client_conn = 20000
[[backends]]
name = "primary"
port = $pg_port
role = "primary"
EOF
  chown postgres "$dir/proxy$i.toml"
  "${as_pg[@]}" "$(realpath "$proxy")" --config "$dir/proxy$i.toml" >"$dir/proxy$i.log" 2>&1 &
  pids+=($!) ports+=("$port") names+=("proxy$i")
done
for port in "${ports[@]}"; do
  for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 -p "$port" -U postgres && break; sleep 0.2; done
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
