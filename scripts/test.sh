#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what is missing, starts a throwaway
# PostgreSQL cluster, RabbitMQ node and Kafka-protocol broker on free loopback ports, runs
# every test against them, and tears the servers down on exit (also on failure or Ctrl-C).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export OUTBOX_STACK_DIR=${OUTBOX_STACK_DIR:-$ROOT/.stack-test}
# The suite tests both brokers: the Kafka-protocol broker is always built and started.
export OUTBOX_STACK_KAFKA=1
# Its broker checks records against per-topic JSON schemas (a broker that refuses a message).
export OUTBOX_STACK_KAFKA_SCHEMAS=1

scripts/stack.sh install
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }

echo "== docker-compose.yml"
docker-compose -f docker-compose.yml config -q

# The debug build of the workspace and its test binaries takes about 2.5 GB.
target=${CARGO_TARGET_DIR:-$ROOT/target}
mkdir -p "$target"
free_kb=$(df -Pk "$target" | awk 'NR == 2 { print $4 }')
if [ "${free_kb:-0}" -lt $((3 * 1024 * 1024)) ]; then
  echo "warning: only $((free_kb / 1024)) MB free under $target; the build needs about 2.5 GB" >&2
fi

echo "== build"
cargo build --workspace --all-targets --locked

trap 'scripts/stack.sh down' EXIT
scripts/stack.sh down >/dev/null 2>&1 || true
scripts/stack.sh up
# shellcheck disable=SC1091
. "$OUTBOX_STACK_DIR/env"

echo "== test"
log=$OUTBOX_STACK_DIR/cargo-test.log
set +e
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log"
tests_rc=${PIPESTATUS[0]}
# The tests that stop the shared brokers or raise an alarm on them, one at a time, alone.
if [ $# = 0 ]; then
  echo "== serial tests (brokers stopped and alarmed)"
  cargo test -p outbox-tests --test serial --locked -- --ignored --test-threads=1 2>&1 | tee -a "$log"
  serial_rc=${PIPESTATUS[0]}
  [ "$serial_rc" = 0 ] || tests_rc=$serial_rc
fi
set -e

# The chaos suite, small, against each broker: relays killed, the broker and PostgreSQL
# restarted, and the consumers applying the effects killed or stopped mid-stream. The Kafka
# run gets a broker without earlier tests' topics; its restarts are SIGKILLs.
# `scripts/chaos.sh [--broker kafka]` runs the full configuration.
bin=${CARGO_TARGET_DIR:-target}/debug
chaos_failed=0
echo "== chaos (small, RabbitMQ)"
scripts/stack.sh restart rabbitmq
"$bin"/outbox-chaos --broker rabbitmq --messages 5000 --keys 200 --rate 250 --relays 3 \
  --kills 10 --broker-restarts 2 --db-restarts 1 --consumers 2 --consumer-restarts 4 \
  || chaos_failed=$((chaos_failed + 1))
echo "== chaos (small, Kafka)"
scripts/stack.sh reset kafka
"$bin"/outbox-chaos --broker kafka --messages 3000 --keys 200 --rate 250 --relays 3 \
  --kills 6 --broker-restarts 2 --db-restarts 1 --consumers 2 --consumer-restarts 4 \
  || chaos_failed=$((chaos_failed + 1))

# The benchmark, quick: proves the program works (its figures from a debug build on a busy
# machine mean nothing; scripts/bench.sh gives the real ones).
bench_failed=0
echo "== benchmark (quick)"
"$bin"/outbox-bench --quick --relay-bin "$bin"/outbox-relay || bench_failed=1
# The alert and recording rules: valid, and their unit tests pass.
rules_failed=0
echo "== alert rules (promtool)"
( cd deploy/prometheus && promtool check rules outbox-rules.yml && promtool test rules outbox-rules.test.yml ) \
  || rules_failed=1
# The Kubernetes manifest keeps the sidecar pattern (its structure; no cluster here).
echo "== Kubernetes manifest"
manifest_failed=0
python3 deploy/kubernetes/check.py || manifest_failed=1
failures=()
[ "$chaos_failed" = 0 ] || failures+=("chaos ($chaos_failed of 2 runs)")
[ "$bench_failed" = 0 ] || failures+=("benchmark (quick)")
[ "$rules_failed" = 0 ] || failures+=("alert rules (promtool)")
[ "$manifest_failed" = 0 ] || failures+=("Kubernetes manifest (deploy/kubernetes/check.py)")

count() { awk -v word="$1;" '/^test result:/ { for (i = 2; i <= NF; i++) if ($i == word) n += $(i - 1) } END { print n + 0 }' "$log"; }
passed=$(count passed)
failed=$(count failed)
passed=$((passed + 5 - chaos_failed - bench_failed - rules_failed - manifest_failed))
failed=$((failed + chaos_failed + bench_failed + rules_failed + manifest_failed))
if [ "$failed" != 0 ]; then
  echo "== the servers' logs (for the failures above)"
  scripts/stack.sh logs || true
  # Last, so that the end of the output names what failed and why.
  echo "== what failed"
  awk '/^---- .* stdout ----$/ { keep = 1; n = 0 } /^failures:$/ { keep = 0 }
       keep && n++ < 40 { print }' "$log"
  grep -E '^test .* \.\.\. FAILED$' "$log" || true
  for f in "${failures[@]}"; do echo "failed: $f"; done
fi
echo
echo "total: $passed passed, $failed failed"
[ "$tests_rc" = 0 ] && [ "$chaos_failed" = 0 ] && [ "$bench_failed" = 0 ] && [ "$rules_failed" = 0 ] \
  && [ "$manifest_failed" = 0 ]
