#!/usr/bin/env bash
# Dependency audit: every crate in Cargo.lock and fuzz/Cargo.lock against the RustSec advisory
# database, with cargo-audit (it checks the exact versions locked, yanked crates too when the
# registry index is at hand, and fails on any vulnerability).
#
#   scripts/audit.sh             installs cargo-audit if missing (crates.io), fetches the
#                                advisory database (GitHub) and audits both lockfiles
#   MEMCOORD_ADVISORY_DB=DIR scripts/audit.sh
#                                audits against a local copy of the database (a folder with
#                                the layout of github.com/rustsec/advisory-db: crates/NAME/
#                                RUSTSEC-*.md), without fetching: for machines that reach
#                                crates.io but not GitHub
#
# Exit status: 0 no advisory applies; 1 one does (cargo-audit's report says which); 2 the audit
# could not run (no cargo-audit, no database), said on stderr.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-audit >/dev/null 2>&1; then
  echo "audit: installing cargo-audit from crates.io (a few minutes)" >&2
  if ! cargo install cargo-audit --locked --quiet; then
    echo "audit: cargo-audit could not be installed: not audited" >&2
    exit 2
  fi
fi

db_args=()
if [ -n "${MEMCOORD_ADVISORY_DB:-}" ]; then
  db_args=(--db "$MEMCOORD_ADVISORY_DB" --no-fetch)
  echo "audit: advisory database: $MEMCOORD_ADVISORY_DB ($(find "$MEMCOORD_ADVISORY_DB" -name 'RUSTSEC-*.md' | wc -l) advisories), not fetched" >&2
fi

status=0
for lock in Cargo.lock fuzz/Cargo.lock; do
  echo "audit: $lock" >&2
  log=$(mktemp)
  cargo audit "${db_args[@]}" --file "$lock" --deny warnings 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  # cargo-audit exits 1 both for findings and for a database it could not load or fetch.
  if [ "$rc" -ne 0 ] && grep -q "advisory database" "$log" && ! grep -q "^ID:" "$log"; then
    echo "audit: the advisory database could not be fetched or loaded: not audited (set MEMCOORD_ADVISORY_DB to a local copy)" >&2
    rm -f "$log"
    exit 2
  fi
  rm -f "$log"
  [ "$rc" -ne 0 ] && status=1
done
exit $status
