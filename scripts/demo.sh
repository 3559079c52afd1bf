#!/usr/bin/env bash
# The README's first command: the bookstore saga end to end on a local stack. Three services
# (account, warehouse, merchant), each with its own schema and role; orders written with their
# messages in one transaction; the relay as a sidecar process; the consumers with dedup; a
# shipment parked for lack of stock, restocked and replayed by an operator; reconciliation;
# and a check of the final state (exit non-zero if anything is off).
#
#   scripts/demo.sh [--kafka] [--orders N]        the bookstore (RabbitMQ unless --kafka)
#   scripts/demo.sh --throughput [--kafka] [MESSAGES] [KEYS]
#                                                 the throughput demo: a stream of orders
#                                                 relayed end to end (20000 messages, 100 keys)
#
# RabbitMQ runs need no Kafka-protocol broker, so they never build one; --kafka builds it
# the first time (10-15 minutes) and reuses it after.
set -euo pipefail
broker=rabbitmq
mode=bookstore
while [ $# -gt 0 ]; do
  case "$1" in
    --kafka) broker=kafka; shift ;;
    --throughput) mode=throughput; shift ;;
    *) break ;;
  esac
done
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export OUTBOX_STACK_DIR=${OUTBOX_STACK_DIR:-$ROOT/.stack}
bin=${CARGO_TARGET_DIR:-$ROOT/target}/release
if [ "$broker" = rabbitmq ]; then export OUTBOX_STACK_KAFKA=0; fi

scripts/stack.sh install
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
echo "== build (release)"
if [ "$mode" = bookstore ]; then
  cargo build --release --locked -p outbox-relay -p outbox-consumer -p outbox-bookstore \
    --features outbox-consumer/cli --bin outbox-relay --bin outbox-consumer --bin outbox-bookstore
else
  cargo build --release --locked -p outbox-relay -p outbox-tests --bin outbox-relay --bin outbox-demo
fi

relay_pid=
cleanup() {
  if [ -n "$relay_pid" ] && kill -0 "$relay_pid" 2>/dev/null; then
    kill -TERM "$relay_pid"; wait "$relay_pid" || true
  fi
  scripts/stack.sh down
}
trap cleanup EXIT
scripts/stack.sh down >/dev/null 2>&1 || true
scripts/stack.sh up
# shellcheck disable=SC1091
. "$OUTBOX_STACK_DIR/env"

if [ "$mode" = bookstore ]; then
  kafka_flag=()
  if [ "$broker" = kafka ]; then kafka_flag=(--kafka); fi
  echo
  "$bin"/outbox-bookstore "${kafka_flag[@]}" --relay-log "$OUTBOX_STACK_DIR/relay.log" "$@"
  exit $?
fi

# The throughput demo.
export OUTBOX__DATABASE__URL=$DATABASE_URL OUTBOX__RABBITMQ__URL=$AMQP_URL
export OUTBOX__BROKER=$broker OUTBOX__KAFKA__BROKERS=${KAFKA_BROKERS:-} DEMO_BROKER=$broker
http_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
export OUTBOX__HTTP__LISTEN=127.0.0.1:$http_port
export OUTBOX__HTTP__BACKLOG_INTERVAL=1s
echo "== broker: $broker"

echo "== migrate"
"$bin"/outbox-relay migrate
echo "== relay (log: $OUTBOX_STACK_DIR/relay.log)"
"$bin"/outbox-relay run >"$OUTBOX_STACK_DIR/relay.log" 2>&1 &
relay_pid=$!
echo "== produce and consume"
status=0
"$bin"/outbox-demo "$@" || status=$?
echo "== outbox-relay status"
"$bin"/outbox-relay status
echo "== the relay's probes and metrics (http://127.0.0.1:$http_port)"
python3 - "$http_port" <<'EOF' || true
import sys, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
for path in ("/livez", "/readyz"):
    try:
        with urllib.request.urlopen(base + path, timeout=5) as r:
            print(f"GET {path}: {r.status} {r.read().decode().strip()}")
    except Exception as e:
        print(f"GET {path}: {e}")
with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
    for line in r.read().decode().splitlines():
        if line.startswith(("outbox_messages_published_total", "outbox_backlog_messages",
                            "outbox_partitions_owned", "outbox_broker_up",
                            "outbox_commit_to_confirm_seconds_count")):
            print("  " + line)
EOF
kill -TERM "$relay_pid"; wait "$relay_pid" || status=$?
relay_pid=
echo "== relay stopped; last log lines:"
tail -n 3 "$OUTBOX_STACK_DIR/relay.log"
exit $status
