# Shared by the pooler benchmarks and builds (callgrind-poolers.sh,
# storm-ab.sh, build-proxy-pgo.sh):
# a scratch PostgreSQL 15 (pgbench scale 10) in a temporary directory,
# and the PgBouncer and pgha-proxy configurations both measure, in
# transaction mode with a pool of 32. Source it from a script running as
# root under `set -euo pipefail` with $1 of poolers_init the directory's
# prefix; the servers run as the postgres user, and the EXIT trap stops
# them (and every pid in `pids`) and removes the directory.

bin=/usr/lib/postgresql/15/bin
as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups)
pids=()

# wait_ready PORT [TRIES]: until a pooler or server answers on PORT, up to
# TRIES (default 50) checks 0.2 s apart.
wait_ready() {
  for _ in $(seq "${2:-50}"); do pg_isready -q -h 127.0.0.1 -p "$1" -U postgres && break; sleep 0.2; done
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

poolers_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}

# poolers_init PREFIX: makes $dir, starts PostgreSQL on $pg_port.
poolers_init() {
  dir=$(mktemp -d "/tmp/$1.XXXXXX")
  chown postgres "$dir"
  trap poolers_cleanup EXIT
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
}

# write_pgbouncer_ini PORT: $dir/pgbouncer.ini listening on PORT.
write_pgbouncer_ini() {
  cat >"$dir/pgbouncer.ini" <<EOF
[databases]
postgres = host=127.0.0.1 port=$pg_port dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $1
unix_socket_dir =
auth_type = trust
auth_file = $dir/users.txt
pool_mode = transaction
default_pool_size = 32
max_client_conn = 20000
ignore_startup_parameters = extra_float_digits
logfile =
pidfile =
log_connections = 0
log_disconnections = 0
EOF
  echo '"postgres" ""' >"$dir/users.txt"
  chown postgres "$dir/pgbouncer.ini" "$dir/users.txt"
}

# write_proxy_toml FILE ID PORT: a proxy config with read-write port PORT.
write_proxy_toml() {
  cat >"$1" <<EOF
id = "$2"
listen_rw = "127.0.0.1:$3"
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
  chown postgres "$1"
}
