#!/usr/bin/env bash
# Time `egress-proxy replay` over a large audit log (README "Seeing what was
# denied", the figure there). Writes N JSON records (default 1,000,000) made
# by cycling tests/fixtures/audit/gateway.jsonl (its 23 records: allow,
# bypass, report and deny lines), then replays them under the fixture
# configuration with catalog-drops.toml as the proposed catalog, so every
# record is read, parsed, decided twice and most are compared.
#
#   benches/replay.sh [--records N] [--bin target/release/egress-proxy] [--gzip]
#
# Prints records, seconds and records/second on stdout; the log is written
# to a temporary directory and removed at the end.
set -euo pipefail

records=1000000
bin=target/release/egress-proxy
gzip=0
while [ $# -gt 0 ]; do
  case "$1" in
    --records) records="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    --gzip) gzip=1; shift ;;
    *) echo "usage: $0 [--records N] [--bin PATH] [--gzip]" >&2; exit 1 ;;
  esac
done
root="$(cd "$(dirname "$0")/.." && pwd)"
fx="$root/tests/fixtures/audit"
[ -x "$bin" ] || { echo "no binary at $bin (cargo build --release)" >&2; exit 1; }

dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
log="$dir/audit.log"
# Only whole record lines (the fixture has one deliberately truncated line).
grep '"duration_ms":[0-9]*}$' "$fx/gateway.jsonl" >"$dir/seed"
awk -v n="$records" '
  { line[NR] = $0 }
  END { for (i = 0; i < n; i++) print line[i % NR + 1] }
' "$dir/seed" >"$log"
if [ "$gzip" = 1 ]; then gzip -1 "$log"; log="$log.gz"; fi
echo "log: $records records, $(du -h "$log" | cut -f1) ($log)" >&2

start=$(date +%s.%N)
set +e
"$bin" replay --config "$fx/egress-proxy.toml" --audit "$log" \
  --catalog "$fx/catalog-drops.toml" >"$dir/report" 2>"$dir/stderr"
code=$?
set -e
end=$(date +%s.%N)
# 3: the proposed catalog takes something away, as intended here.
if [ "$code" != 3 ]; then
  echo "replay exited $code" >&2; cat "$dir/stderr" >&2; exit 1
fi
cat "$dir/stderr" >&2
awk -v n="$records" -v s="$start" -v e="$end" \
  'BEGIN { t = e - s; printf "replay: %d records in %.2f s = %.0f records/s\n", n, t, n / t }'
