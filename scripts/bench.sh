#!/usr/bin/env bash
# The benchmark on a fresh machine: installs what is missing, builds in release mode, starts
# a throwaway stack (PostgreSQL, RabbitMQ, the Kafka-protocol broker) under .stack-bench/,
# runs outbox-bench (raw ceilings, relay drains, latency, memory) and tears the stack down.
#
#   scripts/bench.sh            the full run (about 10 minutes on two cores)
#   scripts/bench.sh --quick    a small run that proves it works
#   scripts/bench.sh --json     figures as JSON
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export OUTBOX_STACK_DIR=${OUTBOX_STACK_DIR:-$ROOT/.stack-bench}
# The benchmark's cluster counts query time by query (pg_stat_statements).
export OUTBOX_STACK_PG_STATEMENTS=1

scripts/stack.sh install
echo "== build (release)"
cargo build --release --locked -p outbox-relay -p outbox-tests --bin outbox-relay --bin outbox-bench

trap 'scripts/stack.sh down' EXIT
scripts/stack.sh down >/dev/null 2>&1 || true
scripts/stack.sh up
# shellcheck disable=SC1091
. "$OUTBOX_STACK_DIR/env"
echo "== machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(date -u +%Y-%m-%dT%H:%MZ)"
"${CARGO_TARGET_DIR:-target}/release/outbox-bench" --relay-bin "${CARGO_TARGET_DIR:-target}/release/outbox-relay" "$@"
