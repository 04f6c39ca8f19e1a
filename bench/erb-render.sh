#!/usr/bin/env bash
# Times ERB rendering: `deploy --dry-run` of the beacon fixture release
# (tests/fixtures/releases/beacon) with N instances of its keeper job (4
# templates and a monit file each: 5 x N templates, 200 at N=40), cold (a
# new Ruby process every run, as every deploy has). Prints, over RUNS runs,
# the renderer's own time (from the director's log) and the whole dry run's.
# Target: 200 templates of 40 instances rendered in under 0.5 s.
# Usage: bench/erb-render.sh [N] (default 40); RUNS (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v ruby >/dev/null || { echo "needs ruby: apt-get install ruby" >&2; exit 1; }
cargo build -q
bosun=$PWD/target/debug/bosun
n=${1:-40}
runs=${RUNS:-10}
release=${RELEASE:-$PWD/tests/fixtures/releases/beacon}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
host_os=$(. /etc/os-release && echo "$ID-$VERSION_CODENAME")
cat > "$work/cc.yml" <<CC
azs: [{name: z1}]
networks:
- name: default
  type: manual
  subnets: [{range: 10.250.0.0/20, gateway: 10.250.0.1, azs: [z1]}]
vm_types: [{name: default}]
compilation: {workers: 1, az: z1, network: default}
CC
cat > "$work/m.yml" <<M
name: bench
releases: [{name: beacon, version: latest, path: $release}]
stemcells: [{alias: default, os: $host_os, version: latest}]
update: {canaries: 1, max_in_flight: 10, canary_watch_time: 1000, update_watch_time: 1000}
instance_groups:
- name: keeper
  instances: $n
  azs: [z1]
  vm_type: default
  stemcell: default
  networks: [{name: default}]
  jobs:
  - {name: keeper, release: beacon, properties: {keeper: {tags: [a, b]}}}
M
"$bosun" --state-dir "$work/state" update-cloud-config "$work/cc.yml" >/dev/null
render=() whole=()
for _ in $(seq "$runs"); do
    t0=$(date +%s%N)
    NO_COLOR=1 BOSUN_LOG=bosun_director::templates=info "$bosun" --state-dir "$work/state" deploy "$work/m.yml" --dry-run \
        >"$work/out" 2>"$work/log" || { cat "$work/out" "$work/log" >&2; exit 1; }
    t1=$(date +%s%N)
    whole+=("$(( (t1 - t0) / 1000000 ))")
    ms=$(grep -o 'elapsed_ms=[0-9.]*' "$work/log" | head -1 | cut -d= -f2)
    [ -n "$ms" ] || { cat "$work/log" >&2; exit 1; }
    render+=("${ms%.*}")
done
stats() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {printf "min %d ms, median %d ms, max %d ms", a[1], a[int((NR+1)/2)], a[NR]}'; }
echo "ERB render, $((n * 5)) templates of $n instances, cold Ruby: $(stats "${render[@]}")"
echo "whole deploy --dry-run:                         $(stats "${whole[@]}")"
