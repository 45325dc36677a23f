#!/usr/bin/env bash
# Instructions per request, counted by callgrind: the same number on a busy or an idle machine.
# Each variant runs N and 2N times; the difference / N is the per-request count, free of
# start-up cost.
#   bash benches/icount.sh        the layer benchmark's variants (N=2000)
#   bash benches/icount.sh e2e    the end-to-end service's GET and PUT (one shape, both shapes
#                                 by hand, twintrack; N_E2E=200 requests): the whole bench
#                                 process's instructions, its in-process HTTP client's and timed
#                                 background work's (pools, flag cache) included, PostgreSQL's
#                                 not (its own processes); varies by about 1,000 between runs
# (needs valgrind: apt-get install valgrind)
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
bench=${1:-layer}
N=${N:-2000}
[ "$bench" = e2e ] && N=${N_E2E:-200}
bin=$(cargo bench --bench "$bench" --no-run --message-format=json 2>/dev/null \
  | grep -o '"executable":"[^"]*"' | grep "/$bench-" | head -1 | cut -d'"' -f4)
count() {
  local n
  n=$(TWINTRACK_ICOUNT="$1:$2" valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" 2>&1 \
    | sed -n 's/.*Collected : \([0-9]*\).*/\1/p')
  [[ -n $n ]] || { echo "no count for $1 ($2 runs): run it without valgrind to see why" >&2; exit 1; }
  echo "$n"
}
# The main thread only (the in-process variants run there): the count then leaves out
# background threads (a file watcher, database workers) whose timing varies between runs.
count_main() {
  local dir
  dir=$(mktemp -d)
  TWINTRACK_ICOUNT="$1:$2" valgrind --tool=callgrind --separate-threads=yes \
    --callgrind-out-file="$dir/out" "$bin" >/dev/null 2>&1
  sed -n 's/^summary: \([0-9]*\).*/\1/p' "$dir/out-01"
  rm -rf "$dir"
}
per_request() {
  local a b
  a=$(count "$1" "$N"); b=$(count "$1" "$((2 * N))")
  echo $(( (b - a) / N ))
}
per_request_main() {
  local a b
  a=$(count_main "$1" "$N"); b=$(count_main "$1" "$((2 * N))")
  echo $(( (b - a) / N ))
}
row() {
  printf '%-28s %10s %10s %8s %7s\n' "$1" "$2" "$3" "$(($3 - $2))" \
    "$(awk -v a="$2" -v b="$3" 'BEGIN { printf "%.3f", b / a }')"
}
if [ "$bench" = e2e ]; then
  printf '%-28s %10s %10s %10s %7s\n' request 'one shape' 'by hand' twintrack 'to hand'
  for kind in get put; do
    plain=$(per_request "plain:$kind"); hand=$(per_request "by_hand:$kind")
    ours=$(per_request "twintrack:$kind")
    printf '%-28s %10s %10s %10s %7s\n' "$kind" "$plain" "$hand" "$ours" \
      "$(awk -v a="$hand" -v b="$ours" 'BEGIN { printf "%.3f", b / a }')"
  done
  exit 0
fi
printf '%-28s %10s %10s %8s %7s\n' variant bare twintrack added ratio
noop=$(per_request noop_bare); layered=$(per_request noop_twintrack)
row "noop service_fn" "$noop" "$layered"
# The same layer with its stages from a flagd file (issue 16), main thread only: the first
# column is the layer over twintrack's SQL store, not the bare service.
row "noop, SQL store -> flagd" "$(per_request_main noop_twintrack)" \
  "$(per_request_main noop_twintrack_flagd)"
axum=$(per_request axum_bare); row "axum Router, in process" "$axum" "$(per_request axum_twintrack)"
http=$(per_request http_bare)
row "http, layer around router" "$http" "$(per_request http_twintrack)"
row "http, Router::layer" "$http" "$(per_request http_twintrack_router_layer)"
