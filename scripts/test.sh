#!/usr/bin/env bash
# Runs every check and test of the workspace, as CI does.
#
# RabbitMQ (127.0.0.1:5672), Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432) must
# answer: the RabbitMQ transport, the Redis saga repository and the PostgreSQL outbox are
# tested against the real servers. This script starts them when installed but stopped, and
# installs them with apt-get when missing; likewise Debian's chromium and chromium-driver, for
# the dashboard's test in a real browser, and python3 with venv, for the benchmark's
# FastStream peer.
set -euo pipefail
cd "$(dirname "$0")/.."
# One build of everything: incremental caches would only fill the disk (tens of GB).
export CARGO_INCREMENTAL=0

log() { printf '==> %s\n' "$*"; }

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() {
  local port=$1 name=$2 seconds=${3:-90}
  for _ in $(seq 1 "$((seconds * 2))"); do
    answers "$port" && return 0
    sleep 0.5
  done
  echo "error: $name does not answer on 127.0.0.1:$port after ${seconds}s" >&2
  return 1
}

apt_updated=0
install_package() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: $1 is missing and this script is not root; install it: apt-get install -y $1" >&2
    exit 1
  fi
  if [ "$apt_updated" -eq 0 ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  log "installing $1"
  # The package's own service start may fail without systemd; we start the server ourselves.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null || true
  command -v "$2" >/dev/null || { echo "error: installing $1 did not provide $2" >&2; exit 1; }
}

ensure_redis() {
  if answers 6379; then log "redis answers on 127.0.0.1:6379"; return; fi
  command -v redis-server >/dev/null || install_package redis-server redis-server
  answers 6379 || { log "starting redis"; redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null; }
  wait_for_port 6379 redis 30
  log "redis answers on 127.0.0.1:6379"
}

ensure_rabbitmq() {
  if answers 5672; then log "rabbitmq answers on 127.0.0.1:5672"; return; fi
  command -v rabbitmq-server >/dev/null || install_package rabbitmq-server rabbitmq-server
  answers 5672 || { log "starting rabbitmq"; rabbitmq-server -detached >/dev/null 2>&1 || true; }
  wait_for_port 5672 rabbitmq 120
  log "rabbitmq answers on 127.0.0.1:5672"
}

# Tests connect as `postgres` to the database `test` (trust authentication on loopback), or
# to DATABASE_URL when set; each test works in a schema of its own.
ensure_postgres() {
  if answers 5432; then log "postgresql answers on 127.0.0.1:5432"; else
    command -v pg_ctlcluster >/dev/null || install_package postgresql pg_ctlcluster
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)
    if [ -z "$version" ]; then echo "error: no PostgreSQL cluster in /etc/postgresql" >&2; exit 1; fi
    log "starting postgresql $version"
    pg_ctlcluster "$version" main start || true
    wait_for_port 5432 postgresql 60
    log "postgresql answers on 127.0.0.1:5432"
  fi
  if [ -z "${DATABASE_URL:-}" ] && command -v psql >/dev/null; then
    # A fresh install has no `test` database and asks for passwords on TCP: make it as the tests expect.
    if ! psql "postgres://postgres@127.0.0.1:5432/test" -qAtc "select 1" >/dev/null 2>&1; then
      log "preparing the postgresql test database"
      local hba
      hba=$(su postgres -c "psql -qAtc 'show hba_file'" 2>/dev/null || true)
      if [ -n "$hba" ] && ! grep -q "rust-bus tests" "$hba"; then
        printf '# rust-bus tests\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n' | cat - "$hba" > "$hba.new" && mv "$hba.new" "$hba"
        su postgres -c "psql -qAtc 'select pg_reload_conf()'" >/dev/null || true
      fi
      su postgres -c "createdb test" 2>/dev/null || true
    fi
  fi
}

# The dashboard's test drives Debian's Chromium through chromedriver.
ensure_chromium() {
  command -v chromium >/dev/null || install_package chromium chromium
  command -v chromedriver >/dev/null || install_package chromium-driver chromedriver
  log "chromium and chromedriver installed"
}

# The benchmark's peer comparison runs FastStream in a virtual environment it creates.
ensure_python_venv() {
  command -v python3 >/dev/null || install_package python3 python3
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    install_package python3-venv python3
  fi
  log "python3 with venv available"
}

ensure_redis
ensure_rabbitmq
ensure_postgres
ensure_chromium
ensure_python_venv

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

# The libraries build without their optional parts: no protobuf, no OpenTelemetry SDK, no Redis.
log "cargo clippy (libraries without default features)"
cargo clippy -p bus-core -p bus-saga -p bus-inmemory -p bus-rabbitmq --no-default-features -- -D warnings

log "cargo doc (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --quiet

log "cargo test"
cargo test --workspace

# What a newcomer should see: each flow printed as a trace tree, then the metrics.
expect_output() {
    local what=$1 output=$2 pattern
    shift 2
    for pattern in "$@"; do
        if ! grep -qE -- "$pattern" <<<"$output"; then
            echo "$what printed no line matching '$pattern'; it printed:" >&2
            echo "$output" >&2
            exit 1
        fi
    done
}

log "examples (in-memory, then RabbitMQ)"
# Printing mode even where a collector is configured for other runs.
orders=$(env -u OTEL_EXPORTER_OTLP_ENDPOINT cargo run --quiet --example orders)
expect_output "the orders example" "$orders" '^trace [0-9a-f]{32}$' '^    NewOrder receive \(' '^      NewOrder process \(' 'messaging\.bus\.consumed'
saga=$(env -u OTEL_EXPORTER_OTLP_ENDPOINT cargo run --quiet --example order_saga)
expect_output "the order saga example" "$saga" '^trace [0-9a-f]{32}$' 'OrderState process \(.*saga Initial -> Pending' 'saga Pending -> Final' 'messaging\.bus\.delivery\.latency'
failures=$(cargo run --quiet --example failures)
expect_output "the failures example" "$failures" '^done: nothing lost'
amqp="amqp://guest:guest@127.0.0.1:5672/%2f"
AMQP_ADDR="$amqp" cargo run --quiet --example orders >/dev/null
failures=$(AMQP_ADDR="$amqp" cargo run --quiet --example failures)
expect_output "the failures example on RabbitMQ" "$failures" '^done: nothing lost' 'MT-Fault-Message: card gateway timed out'
AMQP_ADDR="$amqp" REDIS_URL="redis://127.0.0.1:6379" cargo run --quiet --example order_saga >/dev/null
rate=$(cargo run --quiet --example rate_limit)
expect_output "the rate limit example" "$rate" '^consumed 10 orders in (1\.[89]|[2-9]\.|[1-9][0-9]+\.)'
rate=$(AMQP_ADDR="$amqp" cargo run --quiet --example rate_limit)
expect_output "the rate limit example on RabbitMQ" "$rate" '^consumed 10 orders in (1\.[89]|[2-9]\.|[1-9][0-9]+\.)' 'transport: RabbitMQ'
outbox=$(cargo run --quiet --example outbox)
expect_output "the outbox example" "$outbox" '^charges for order 1001: 1 '
outbox=$(AMQP_ADDR="$amqp" cargo run --quiet --example outbox)
expect_output "the outbox example on RabbitMQ" "$outbox" '^charges for order 1001: 1 ' 'transport: RabbitMQ'
log "benchmark smoke run (a few hundred messages per scenario; figures are meaningless in debug)"
cargo run --quiet -p bus-bench -- --smoke >/dev/null
log "all checks passed"
