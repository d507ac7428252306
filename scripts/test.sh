#!/usr/bin/env bash
# The test suite (`make test`): lint, types, then pytest with what the tests use
# running: a throw-away PostgreSQL on 127.0.0.1:5433 for the multi-host
# `stoker serve` tests (scripts/ci-postgres.sh), stopped and deleted afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests bench
.venv/bin/mypy
# shellcheck source=scripts/ci-postgres.sh
source scripts/ci-postgres.sh >/dev/null
trap stoker_ci_postgres_stop EXIT
echo "test: PostgreSQL for the service tests at $STOKER_TEST_PG_URL"
.venv/bin/pytest "$@"
