#!/usr/bin/env bash
# Throwaway local stack for the demo and the tests: a PostgreSQL cluster, a RabbitMQ node
# and a Kafka-protocol broker (tansu, storing in a PostgreSQL cluster of its own) on free
# loopback ports, with all state under $OUTBOX_STACK_DIR (default .stack/).
#
#   scripts/stack.sh install [--no-kafka]
#                              install missing Debian packages (idempotent) and, unless
#                              --no-kafka, build the Kafka-protocol broker once
#   scripts/stack.sh up [--no-kafka]
#                              install, start the servers, write $OUTBOX_STACK_DIR/env;
#                              --no-kafka: PostgreSQL and RabbitMQ only (no broker build)
#   scripts/stack.sh down      stop what `up` started (by PID) and remove the state
#   scripts/stack.sh env       print the exports for the running stack
#   scripts/stack.sh restart rabbitmq|kafka|postgres
#                              restart one server in place (same port and data); the
#                              Kafka-protocol broker is killed with SIGKILL, as in a crash
#   scripts/stack.sh rabbitmqctl ARGS...
#                              rabbitmqctl against the stack's node (e.g. to raise an alarm)
#   scripts/stack.sh reset kafka
#                              stop the Kafka-protocol broker, drop its data, start it afresh
#                              on the same port (a clean broker for the next suite)
#
# `up` is safe to run twice: a running stack is reused. Everything listens on 127.0.0.1.
# OUTBOX_STACK_KAFKA=0 in the environment means the same as --no-kafka.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STACK_DIR=${OUTBOX_STACK_DIR:-$ROOT/.stack}
ENV_FILE=$STACK_DIR/env

TANSU_VERSION=0.6.0
KAFKA=${OUTBOX_STACK_KAFKA:-1}

log() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

pg_bindir() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  return 1
}

install() {
  local pkgs=()
  pg_bindir >/dev/null || pkgs+=(postgresql)
  command -v psql >/dev/null || pkgs+=(postgresql-client)
  [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || pkgs+=(rabbitmq-server)
  command -v python3 >/dev/null || pkgs+=(python3)
  # The Kubernetes manifest's check (deploy/kubernetes/check.py) reads YAML.
  python3 -c 'import yaml' 2>/dev/null || pkgs+=(python3-yaml)
  # Certificates for the TLS listeners of the local servers.
  command -v openssl >/dev/null || pkgs+=(openssl)
  # Only to validate docker-compose.yml; no container runs here.
  command -v docker-compose >/dev/null || pkgs+=(docker-compose)
  # rdkafka's bundled librdkafka builds with cmake, with TLS (OpenSSL), SASL (Cyrus SASL
  # for GSSAPI; PLAIN, SCRAM and OAUTHBEARER are built in), OIDC token fetches (libcurl)
  # and the gzip codec (zlib); snappy, lz4 and zstd are compiled from bundled sources.
  command -v cmake >/dev/null || pkgs+=(cmake)
  command -v pkg-config >/dev/null || pkgs+=(pkg-config)
  local dev
  for dev in libcurl4-openssl-dev libsasl2-dev libssl-dev zlib1g-dev; do
    dpkg -s "$dev" >/dev/null 2>&1 || pkgs+=("$dev")
  done
  # promtool checks and unit-tests the alert rules in deploy/prometheus/ (the package
  # brings Prometheus itself too; without its recommends, nothing else).
  local bare=()
  command -v promtool >/dev/null || bare+=(prometheus)
  if [ ${#pkgs[@]} -gt 0 ] || [ ${#bare[@]} -gt 0 ]; then
    log "installing ${pkgs[*]} ${bare[*]}"
    as_root apt-get update -qq
  fi
  if [ ${#pkgs[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${pkgs[@]}" >/dev/null
  fi
  if [ ${#bare[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${bare[@]}" >/dev/null
  fi
  if [ "$KAFKA" != 0 ]; then install_tansu; fi
  # Debian starts the packaged services where it can; ours run on private ports, and a
  # packaged node would only hold on to memory.
  if command -v service >/dev/null && [ -e /etc/init.d/rabbitmq-server ]; then
    as_root service rabbitmq-server stop >/dev/null 2>&1 || true
  fi
  if command -v service >/dev/null && [ -e /etc/init.d/prometheus ]; then
    as_root service prometheus stop >/dev/null 2>&1 || true
  fi
}

# A free TCP port on 127.0.0.1 (the kernel picks; a clash between picking and binding is
# possible but unlikely, and `up` fails loudly if it happens).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# A private CA and a certificate for localhost/127.0.0.1, signed by it, for the servers'
# TLS listeners; a client certificate (PEM and PKCS#12, password "outbox") for client
# authentication; and a second CA that signed nothing, to show a wrong CA being refused.
make_certs() {
  local t=$STACK_DIR/tls
  mkdir -p "$t"
  ( cd "$t"
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=outbox test CA" \
      -keyout ca.key -out ca.crt
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=another CA" \
      -keyout other-ca.key -out other-ca.crt
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
      -extfile server.ext -out server.crt
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    openssl req -newkey rsa:2048 -nodes -subj "/CN=guest" -keyout client.key -out client.csr
    openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
      -extfile client.ext -out client.crt
    openssl pkcs12 -export -in client.crt -inkey client.key -passout pass:outbox -out client.p12
    chmod 644 ./*.crt ./*.key ./*.p12
  ) >"$STACK_DIR/tls.log" 2>&1 || { cat "$STACK_DIR/tls.log" >&2; die "cannot make test certificates"; }
}

start_postgres() {
  local bindir port data
  bindir=$(pg_bindir) || die "PostgreSQL server binaries not found after install"
  port=$(free_port)
  data=$STACK_DIR/pg
  mkdir -p "$data"
  # initdb refuses to run as root.
  local runas=()
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || as_root useradd --system --no-create-home postgres
    chown -R postgres "$data"
    runas=(runuser -u postgres --)
  fi
  # Password auth over TCP, so that wrong credentials are refused as they would be in
  # production; the local socket (used only by this script) trusts.
  echo postgres >"$STACK_DIR/pg.pw"
  chmod 644 "$STACK_DIR/pg.pw"
  "${runas[@]}" "$bindir/initdb" -D "$data" -U postgres --pwfile="$STACK_DIR/pg.pw" \
    --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$STACK_DIR/pg-initdb.log" 2>&1 \
    || { cat "$STACK_DIR/pg-initdb.log" >&2; die "initdb failed"; }
  # PostgreSQL wants its key private to the server's user.
  cp "$STACK_DIR/tls/server.crt" "$STACK_DIR/tls/server.key" "$data/"
  chmod 600 "$data/server.key"
  if [ ${#runas[@]} -gt 0 ]; then chown postgres "$data/server.crt" "$data/server.key"; fi
  cat >>"$data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
unix_socket_directories = '$data'
max_connections = 300
# Two-phase commit, for the test of producers under an XA/JTA transaction manager.
max_prepared_transactions = 10
fsync = on
shared_buffers = 256MB
log_min_messages = warning
EOF
  # The benchmark counts the relay's query time by query (OUTBOX_STACK_PG_STATEMENTS=1, set
  # by scripts/bench.sh only: the tests' cluster runs without it).
  if [ "${OUTBOX_STACK_PG_STATEMENTS:-}" = 1 ]; then
    printf '%s\n' "shared_preload_libraries = 'pg_stat_statements'" "pg_stat_statements.max = 1000" \
      >>"$data/postgresql.conf"
  fi
  "${runas[@]}" "$bindir/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 start >/dev/null \
    || { tail -20 "$data/server.log" >&2; die "PostgreSQL did not start"; }
  head -1 "$data/postmaster.pid" >"$STACK_DIR/pg.pid"
  echo "$port" >"$STACK_DIR/pg.port"
  log "PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') on 127.0.0.1:$port"
}

start_rabbitmq() {
  local port tls dist epmd rdir t=$STACK_DIR/tls
  port=$(free_port); tls=$(free_port); dist=$(free_port); epmd=$(free_port)
  rdir=$STACK_DIR/rabbitmq
  mkdir -p "$rdir/mnesia" "$rdir/log" "$rdir/home"
  echo '[].' >"$rdir/enabled_plugins.erl"
  cat >"$rdir/rabbit.env" <<EOF
export HOME=$rdir/home
export RABBITMQ_NODENAME=outbox-$port@localhost
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT=$port
export RABBITMQ_DIST_PORT=$dist
export ERL_EPMD_PORT=$epmd
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_MNESIA_BASE=$rdir/mnesia
export RABBITMQ_LOG_BASE=$rdir/log
export RABBITMQ_ENABLED_PLUGINS_FILE=$rdir/enabled_plugins.erl
export RABBITMQ_CONFIG_FILE=$rdir/rabbitmq
export RABBITMQ_PID_FILE=$rdir/beam.pid
EOF
  # Guest may log in over loopback only, which is where the tests connect.
  # A TLS listener too; a client certificate is checked when one is sent, not required.
  cat >"$rdir/rabbitmq.conf" <<EOF
loopback_users.guest = true
log.console = false
listeners.ssl.default = $tls
ssl_options.cacertfile = $t/ca.crt
ssl_options.certfile = $t/server.crt
ssl_options.keyfile = $t/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
EOF
  echo "$port" >"$STACK_DIR/rabbitmq.port"
  echo "$tls" >"$STACK_DIR/rabbitmq-tls.port"
  boot_rabbitmq
  log "RabbitMQ $(rabbit_ctl version 2>/dev/null | tail -1) on 127.0.0.1:$port (TLS on $tls)"
}

# Starts the node configured in $STACK_DIR/rabbitmq (same ports and data every time).
boot_rabbitmq() {
  local rdir=$STACK_DIR/rabbitmq i
  # shellcheck disable=SC1091
  ( . "$rdir/rabbit.env"
    cd "$rdir"
    setsid /usr/lib/rabbitmq/bin/rabbitmq-server >>"$rdir/log/stdout.log" 2>&1 &
    echo $! >"$STACK_DIR/rabbitmq.pid" )
  for i in $(seq 1 120); do
    if rabbit_ctl -q await_startup --timeout 2 >/dev/null 2>&1; then
      return 0
    fi
    pid_alive "$STACK_DIR/rabbitmq.pid" || break
    sleep 1
  done
  tail -30 "$rdir/log/stdout.log" >&2 || true
  die "RabbitMQ did not start"
}

# tansu, the Apache-2.0 Kafka-protocol broker, from the Rust crate registry, built with its
# PostgreSQL storage engine: every produce is a PostgreSQL transaction, so a broker killed
# with SIGKILL comes back with everything it acknowledged. Built once (about 10-15 minutes on
# two cores) into a cache of its own and reused afterwards; OUTBOX_TANSU_BIN points at a
# binary built elsewhere (it must have the `postgres` feature).
TANSU_ROOT=${OUTBOX_TANSU_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/outbox/tansu-$TANSU_VERSION-postgres}

tansu_bin() {
  if [ -n "${OUTBOX_TANSU_BIN:-}" ]; then
    [ -x "$OUTBOX_TANSU_BIN" ] || die "OUTBOX_TANSU_BIN=$OUTBOX_TANSU_BIN is not an executable"
    echo "$OUTBOX_TANSU_BIN"; return 0
  fi
  [ -x "$TANSU_ROOT/bin/tansu" ] && { echo "$TANSU_ROOT/bin/tansu"; return 0; }
  return 1
}

install_tansu() {
  tansu_bin >/dev/null && return 0
  command -v cargo >/dev/null || die "cargo is needed to build the Kafka-protocol broker (tansu)"
  log "building the Kafka-protocol broker (cargo install tansu $TANSU_VERSION --features postgres); this takes 10-15 minutes once"
  mkdir -p "$TANSU_ROOT"
  cargo install tansu --version "$TANSU_VERSION" --locked --features postgres \
    --root "$TANSU_ROOT" >"$TANSU_ROOT/install.log" 2>&1 \
    || { tail -30 "$TANSU_ROOT/install.log" >&2; die "cargo install tansu failed (log: $TANSU_ROOT/install.log)"; }
}

start_kafka() {
  local port
  port=$(free_port)
  mkdir -p "$STACK_DIR/kafka"
  echo "$port" >"$STACK_DIR/kafka.port"
  start_kafka_storage
  boot_kafka
  log "Kafka-protocol broker (tansu $("$(tansu_bin)" --version 2>/dev/null | awk '{print $2}'), PostgreSQL storage) on 127.0.0.1:$port"
}

# The broker's storage: a PostgreSQL cluster of its own (its "disk"), apart from the outbox's
# cluster, so that restarting one never takes the other down. The broker is its only client
# and it trusts loopback. synchronous_commit is off: the faults injected here kill the broker
# process, never this cluster, and what the cluster has committed survives a killed broker.
start_kafka_storage() {
  local bindir port data runas=()
  bindir=$(pg_bindir) || die "PostgreSQL server binaries not found"
  port=$(free_port)
  data=$STACK_DIR/kafka/pg
  mkdir -p "$data"
  if [ "$(id -u)" = 0 ]; then
    chown -R postgres "$data"
    runas=(runuser -u postgres --)
  fi
  "${runas[@]}" "$bindir/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
    >"$STACK_DIR/kafka/initdb.log" 2>&1 \
    || { cat "$STACK_DIR/kafka/initdb.log" >&2; die "initdb for the Kafka-protocol broker's storage failed"; }
  printf '%s\n' "listen_addresses = '127.0.0.1'" "port = $port" \
    "unix_socket_directories = '$data'" "max_connections = 60" "shared_buffers = 128MB" \
    "synchronous_commit = off" "log_min_messages = warning" >>"$data/postgresql.conf"
  echo "$port" >"$STACK_DIR/kafka-pg.port"
  boot_kafka_storage
  kafka_schema
}

boot_kafka_storage() {
  pg_ctl_as -D "$STACK_DIR/kafka/pg" -l "$STACK_DIR/kafka/pg/server.log" -w -t 60 start >/dev/null \
    || { tail -20 "$STACK_DIR/kafka/pg/server.log" >&2; die "the Kafka-protocol broker's PostgreSQL did not start"; }
  head -1 "$STACK_DIR/kafka/pg/postmaster.pid" >"$STACK_DIR/kafka-pg.pid"
}

# Creates the broker's tables (scripts/tansu-pg-schema.sql); with `fresh`, drops the old
# ones and all their data first.
kafka_schema() {
  local drop=()
  [ "${1:-}" = fresh ] && drop=(-c "set client_min_messages = warning" -c "drop schema public cascade" -c "create schema public")
  psql -q -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$(cat "$STACK_DIR/kafka-pg.port")" -U postgres \
    -d postgres "${drop[@]}" -f "$ROOT/scripts/tansu-pg-schema.sql" >/dev/null \
    || die "could not create the Kafka-protocol broker's tables"
}

# Starts the broker on its port with its storage (the same every time).
boot_kafka() {
  local port kdir bin i
  port=$(cat "$STACK_DIR/kafka.port")
  kdir=$STACK_DIR/kafka
  bin=$(tansu_bin) || die "tansu not found; run $0 install"
  pid_alive "$STACK_DIR/kafka-pg.pid" || boot_kafka_storage
  # With OUTBOX_STACK_KAFKA_SCHEMAS=1 (the tests), records of a topic with a JSON schema in
  # kafka/schemas/<topic>.json are checked against it and refused (INVALID_RECORD) when they
  # do not match: a broker that refuses a message for good. Off otherwise: the broker then
  # looks for a schema file on every produce request, which costs the benchmark a third of
  # its Kafka throughput.
  local schemas=()
  if [ "${OUTBOX_STACK_KAFKA_SCHEMAS:-0}" = 1 ]; then
    mkdir -p "$kdir/schemas"
    schemas=(--schema-registry "file://./schemas")
  fi
  ( cd "$kdir"
    RUST_LOG=${TANSU_LOG:-warn} setsid "$bin" broker \
      --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$port" \
      --storage-engine "postgres://postgres@127.0.0.1:$(cat "$STACK_DIR/kafka-pg.port")/postgres?sslmode=disable" \
      "${schemas[@]}" \
      >>"$kdir/broker.log" 2>&1 &
    echo $! >"$STACK_DIR/kafka.pid" )
  for i in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    pid_alive "$STACK_DIR/kafka.pid" || break
    sleep 0.2
  done
  tail -30 "$kdir/broker.log" >&2 || true
  die "the Kafka-protocol broker did not start"
}

pg_ctl_as() {
  local bindir
  bindir=$(pg_bindir) || die "PostgreSQL server binaries not found"
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$bindir/pg_ctl" "$@"
  else
    "$bindir/pg_ctl" "$@"
  fi
}

# Restarts one server in place (same port, same data), for fault-injection tests.
restart() {
  [ -f "$ENV_FILE" ] || die "no stack is running under $STACK_DIR"
  case "${1:-}" in
    rabbitmq)
      rabbit_ctl -q stop >/dev/null 2>&1 || true
      stop_pid "$STACK_DIR/rabbitmq.pid" RabbitMQ
      boot_rabbitmq
      log "RabbitMQ restarted" ;;
    kafka)
      # A crash, not a shutdown: SIGKILL, then the same port and storage.
      require_kafka
      kill_pid "$STACK_DIR/kafka.pid"
      boot_kafka
      log "Kafka-protocol broker killed (SIGKILL) and restarted" ;;
    postgres)
      pg_ctl_as -D "$STACK_DIR/pg" -l "$STACK_DIR/pg/server.log" -m fast -w -t 60 restart >/dev/null \
        || die "PostgreSQL did not restart"
      head -1 "$STACK_DIR/pg/postmaster.pid" >"$STACK_DIR/pg.pid"
      log "PostgreSQL restarted" ;;
    *) die "usage: $0 restart rabbitmq|kafka|postgres" ;;
  esac
}

# A fresh Kafka-protocol broker on the same port, without the data of earlier tests.
reset() {
  [ -f "$ENV_FILE" ] || die "no stack is running under $STACK_DIR"
  case "${1:-}" in
    kafka)
      require_kafka
      stop_pid "$STACK_DIR/kafka.pid" "Kafka-protocol broker"
      pid_alive "$STACK_DIR/kafka-pg.pid" || boot_kafka_storage
      kafka_schema fresh
      boot_kafka
      log "Kafka-protocol broker started afresh" ;;
    *) die "usage: $0 reset kafka" ;;
  esac
}

rabbit_ctl() {
  ( . "$STACK_DIR/rabbitmq/rabbit.env"; /usr/lib/rabbitmq/bin/rabbitmqctl "$@" )
}

write_env() {
  local pg rb rbs
  pg=$(cat "$STACK_DIR/pg.port"); rb=$(cat "$STACK_DIR/rabbitmq.port")
  rbs=$(cat "$STACK_DIR/rabbitmq-tls.port")
  cat >"$ENV_FILE" <<EOF
export OUTBOX_STACK_DIR=$STACK_DIR
export DATABASE_URL=postgres://postgres:postgres@127.0.0.1:$pg/postgres
export AMQP_URL=amqp://guest:guest@127.0.0.1:$rb/%2f
export OUTBOX_TEST_PG_PORT=$pg
export OUTBOX_TEST_AMQP_PORT=$rb
export AMQPS_URL=amqps://guest:guest@localhost:$rbs/%2f
export OUTBOX_TEST_TLS_DIR=$STACK_DIR/tls
EOF
  if [ -f "$STACK_DIR/kafka.port" ]; then
    echo "export KAFKA_BROKERS=127.0.0.1:$(cat "$STACK_DIR/kafka.port")" >>"$ENV_FILE"
    if [ "${OUTBOX_STACK_KAFKA_SCHEMAS:-0}" = 1 ]; then
      echo "export OUTBOX_TEST_KAFKA_SCHEMAS=$STACK_DIR/kafka/schemas" >>"$ENV_FILE"
      # The broker's storage, for tests that inject a storage failure (a record it refuses).
      echo "export OUTBOX_TEST_KAFKA_STORAGE_URL=postgres://postgres@127.0.0.1:$(cat "$STACK_DIR/kafka-pg.port")/postgres?sslmode=disable" >>"$ENV_FILE"
    fi
  fi
}

# Dies unless this stack runs the Kafka-protocol broker.
require_kafka() {
  [ -f "$STACK_DIR/kafka.port" ] || die "this stack runs without Kafka (started with --no-kafka)"
}

up() {
  install
  mkdir -p "$STACK_DIR"
  if pid_alive "$STACK_DIR/pg.pid" && pid_alive "$STACK_DIR/rabbitmq.pid" \
     && { [ "$KAFKA" = 0 ] || pid_alive "$STACK_DIR/kafka.pid"; } && [ -f "$ENV_FILE" ]; then
    log "stack already running ($ENV_FILE)"
    return 0
  fi
  down_quiet
  mkdir -p "$STACK_DIR"
  make_certs
  start_postgres
  start_rabbitmq
  if [ "$KAFKA" != 0 ]; then start_kafka; else log "no Kafka-protocol broker (--no-kafka)"; fi
  write_env
  log "ready: . $ENV_FILE"
}

stop_pid() {
  local file=$1 name=$2 pid i
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && { log "$name did not stop; killing"; kill -KILL "$pid" 2>/dev/null || true; }
  fi
  rm -f "$file"
}

# SIGKILL, then wait until the process is gone.
kill_pid() {
  local file=$1 pid i
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  kill -KILL "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$file"
}

down_quiet() {
  [ -d "$STACK_DIR" ] || return 0
  stop_pid "$STACK_DIR/kafka.pid" "Kafka-protocol broker"
  if [ -f "$STACK_DIR/kafka-pg.pid" ]; then
    pg_ctl_as -D "$STACK_DIR/kafka/pg" -m immediate -w stop >/dev/null 2>&1 || true
    stop_pid "$STACK_DIR/kafka-pg.pid" "the Kafka-protocol broker's PostgreSQL"
  fi
  if [ -f "$STACK_DIR/rabbitmq.pid" ]; then
    rabbit_ctl -q shutdown >/dev/null 2>&1 || true
    stop_pid "$STACK_DIR/rabbitmq.pid" RabbitMQ
    # epmd was started on a private port for this node only.
    if [ -f "$STACK_DIR/rabbitmq/rabbit.env" ]; then
      local epmd
      epmd=$(sed -n 's/^export ERL_EPMD_PORT=//p' "$STACK_DIR/rabbitmq/rabbit.env")
      pkill -f "epmd.*-port $epmd" 2>/dev/null || ERL_EPMD_PORT=$epmd epmd -kill >/dev/null 2>&1 || true
    fi
  fi
  if [ -f "$STACK_DIR/pg.pid" ]; then
    if [ -d "$STACK_DIR/pg" ]; then
      pg_ctl_as -D "$STACK_DIR/pg" -m fast -w stop >/dev/null 2>&1 || true
    fi
    stop_pid "$STACK_DIR/pg.pid" PostgreSQL
  fi
  rm -rf "$STACK_DIR"
}

# The servers' own logs, the notable lines last: what a failed test run leaves to read.
logs() {
  local f
  [ -d "$STACK_DIR" ] || return 0
  for f in "$STACK_DIR"/rabbitmq/log/*.log; do
    [ -f "$f" ] || continue
    echo "--- RabbitMQ: $f (warnings and errors, last 40)"
    grep -E '\[(warning|error|critical)\]|TLS' "$f" | tail -40 || true
  done
  for f in "$STACK_DIR/pg/server.log" "$STACK_DIR/kafka/pg/server.log" "$STACK_DIR/kafka/broker.log"; do
    [ -f "$f" ] || continue
    echo "--- $f (last 30 lines)"
    tail -30 "$f"
  done
}

if [ "${2:-}" = "--no-kafka" ] && { [ "${1:-}" = install ] || [ "${1:-}" = up ]; }; then
  KAFKA=0
fi

case "${1:-}" in
  install) install ;;
  up) up ;;
  down) down_quiet; log "stopped" ;;
  logs) logs ;;
  env) cat "$ENV_FILE" ;;
  restart) restart "${2:-}" ;;
  reset) reset "${2:-}" ;;
  rabbitmqctl) shift; rabbit_ctl "$@" ;;
  *) echo "usage: $0 install|up [--no-kafka]|down|env|logs|restart rabbitmq|kafka|postgres|reset kafka|rabbitmqctl ARGS" >&2; exit 2 ;;
esac
