#!/usr/bin/env bash
# The chaos suite on a local stack: several relays killed with SIGKILL, RabbitMQ and
# PostgreSQL restarted, under a stream of writes; then checks for loss, phantoms and
# per-key order. Options go to outbox-chaos, e.g.
#
#   scripts/chaos.sh                                   # full: 50,000 messages, 200 keys
#   scripts/chaos.sh --messages 5000 --kills 10        # smaller
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export OUTBOX_STACK_DIR=${OUTBOX_STACK_DIR:-$ROOT/.stack-chaos}
PROFILE=${CHAOS_PROFILE:-release}

scripts/stack.sh install
if [ "$PROFILE" = release ]; then
  cargo build --release --locked -p outbox-relay -p outbox-tests --bin outbox-relay --bin outbox-chaos
else
  cargo build --locked -p outbox-relay -p outbox-tests --bin outbox-relay --bin outbox-chaos
fi
trap 'scripts/stack.sh down' EXIT
scripts/stack.sh down >/dev/null 2>&1 || true
scripts/stack.sh up
# shellcheck disable=SC1091
. "$OUTBOX_STACK_DIR/env"
dir=release; [ "$PROFILE" = release ] || dir=debug
"${CARGO_TARGET_DIR:-target}/$dir/outbox-chaos" "$@"
