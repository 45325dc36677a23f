#!/usr/bin/env bash
# Instructions per request for the layer benchmark's variants, counted by callgrind: the same
# number on a busy or an idle machine. Each variant runs N and 2N times; the difference / N is
# the per-request count, free of start-up cost.
#   bash benches/icount.sh            (needs valgrind: apt-get install valgrind)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2000}
bin=$(cargo bench --bench layer --no-run --message-format=json 2>/dev/null \
  | grep -o '"executable":"[^"]*"' | grep '/layer-' | head -1 | cut -d'"' -f4)
count() {
  TWINTRACK_ICOUNT="$1:$2" valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" 2>&1 \
    | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
per_request() {
  local a b
  a=$(count "$1" "$N"); b=$(count "$1" "$((2 * N))")
  echo $(( (b - a) / N ))
}
row() {
  printf '%-28s %10s %10s %8s %7s\n' "$1" "$2" "$3" "$(($3 - $2))" \
    "$(awk -v a="$2" -v b="$3" 'BEGIN { printf "%.3f", b / a }')"
}
printf '%-28s %10s %10s %8s %7s\n' variant bare twintrack added ratio
noop=$(per_request noop_bare); row "noop service_fn" "$noop" "$(per_request noop_twintrack)"
axum=$(per_request axum_bare); row "axum Router, in process" "$axum" "$(per_request axum_twintrack)"
http=$(per_request http_bare)
row "http, layer around router" "$http" "$(per_request http_twintrack)"
row "http, Router::layer" "$http" "$(per_request http_twintrack_router_layer)"
