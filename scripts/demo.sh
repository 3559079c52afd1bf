#!/usr/bin/env bash
# The main job end to end on a local stack: build, start PostgreSQL and RabbitMQ, migrate,
# run the relay as a sidecar process, write a stream of orders with their messages (some
# transactions rolled back) and watch them arrive at a RabbitMQ consumer.
#
#   scripts/demo.sh [--kafka] [MESSAGES] [KEYS]   (defaults: RabbitMQ, 20000 messages, 100 keys)
set -euo pipefail
broker=rabbitmq
if [ "${1:-}" = "--kafka" ]; then broker=kafka; shift; fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export OUTBOX_STACK_DIR=${OUTBOX_STACK_DIR:-$ROOT/.stack}

scripts/stack.sh install
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
echo "== build (release)"
cargo build --release --locked -p outbox-relay -p outbox-tests --bin outbox-relay --bin outbox-demo

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
export OUTBOX__DATABASE__URL=$DATABASE_URL OUTBOX__RABBITMQ__URL=$AMQP_URL
export OUTBOX__BROKER=$broker OUTBOX__KAFKA__BROKERS=$KAFKA_BROKERS DEMO_BROKER=$broker
http_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
export OUTBOX__HTTP__LISTEN=127.0.0.1:$http_port
export OUTBOX__HTTP__BACKLOG_INTERVAL=1s
echo "== broker: $broker"

echo "== migrate"
target/release/outbox-relay migrate
echo "== relay (log: $OUTBOX_STACK_DIR/relay.log)"
target/release/outbox-relay run >"$OUTBOX_STACK_DIR/relay.log" 2>&1 &
relay_pid=$!
echo "== produce and consume"
status=0
target/release/outbox-demo "$@" || status=$?
echo "== outbox-relay status"
target/release/outbox-relay status
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
