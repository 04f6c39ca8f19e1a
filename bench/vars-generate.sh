#!/usr/bin/env bash
# Times `bosun interpolate --vars-store` generating a CA and N leaf
# certificates (default N=10) with each key length given (default: 2048
# 3072, 3072 being the default), then a second run that finds every value
# in the store (nothing generated, the store is not written).
# Usage: bench/vars-generate.sh [N [BITS...]]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q
bosun=target/debug/bosun
n=${1:-10}
shift || true
lengths=("$@")
[ ${#lengths[@]} -gt 0 ] || lengths=(2048 3072)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

now() { date +%s.%N; }
for bits in "${lengths[@]}"; do
    m="$work/m-$bits.yml"
    {
        echo "variables:"
        echo "- {name: ca, type: certificate, options: {is_ca: true, common_name: ca, key_length: $bits}}"
        for i in $(seq 1 "$n"); do
            echo "- {name: c$i, type: certificate, options: {ca: ca, common_name: c$i.example, key_length: $bits}}"
        done
    } >"$m"
    store="$work/creds-$bits.yml"
    t0=$(now)
    "$bosun" interpolate "$m" --vars-store "$store" >/dev/null
    t1=$(now)
    "$bosun" interpolate "$m" --vars-store "$store" >/dev/null
    t2=$(now)
    awk -v b="$bits" -v n="$n" -v a="$t0" -v m="$t1" -v z="$t2" 'BEGIN {
        printf "RSA-%s: %d certificates generated in %.2fs (%.3fs each); rerun, nothing generated: %.3fs\n",
            b, n + 1, m - a, (m - a) / (n + 1), z - m }'
done
