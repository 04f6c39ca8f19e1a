#!/usr/bin/env bash
# Times, on the local CPI, a fresh deploy and a no-op redeploy of N kv
# instances for each N given (default: 3 30 100). Packages are compiled once
# before the timings (the targets are "after the first compile").
# Usage: bench/deploy.sh [N...]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q
bosun=target/debug/bosun
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(3 30 100)

work=$(mktemp -d)
state="$work/state"
cleanup() { "$bosun" --state-dir "$state" -d bench delete-deployment -n >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

cat > "$work/cc.yml" <<CC
azs:
- name: z1
networks:
- name: default
  type: manual
  subnets:
  - range: 127.90.0.0/23
    gateway: 127.90.0.1
    azs: [z1]
vm_types:
- name: default
disk_types:
- name: default
  disk_size: 64
compilation:
  workers: 2
  az: z1
  network: default
CC
"$bosun" --state-dir "$state" update-cloud-config "$work/cc.yml" >/dev/null

manifest() {
cat > "$work/m.yml" <<M
name: bench
releases:
- name: kv
  version: latest
  path: $PWD/releases/kv
stemcells:
- alias: default
  os: $host_os
  version: latest
update:
  canaries: 1
  max_in_flight: $2
  canary_watch_time: 500-30000
  update_watch_time: 500-30000
instance_groups:
- name: kv
  instances: $1
  azs: [z1]
  vm_type: default
  stemcell: default
  persistent_disk_type: default
  networks:
  - name: default
  jobs:
  - name: kv
    release: kv
M
}

host_os=$(. /etc/os-release && echo "$ID-$VERSION_CODENAME")
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }

# Compile once.
manifest 1 1
"$bosun" --state-dir "$state" deploy "$work/m.yml" -n >/dev/null
"$bosun" --state-dir "$state" -d bench delete-deployment -n >/dev/null

printf '%-6s %-14s %-12s %s\n' N max_in_flight fresh_s noop_s
for n in "${sizes[@]}"; do
    # max_in_flight: 1 for the quickstart shape, 10 % of N (at least 1) otherwise.
    mif=$(( n <= 3 ? 1 : (n + 9) / 10 ))
    manifest "$n" "$mif"
    t0=$(now); "$bosun" --state-dir "$state" deploy "$work/m.yml" -n >/dev/null; t1=$(now)
    "$bosun" --state-dir "$state" deploy "$work/m.yml" -n >"$work/noop.txt"; t2=$(now)
    grep -q "no changes" "$work/noop.txt" || { echo "no-op redeploy changed something" >&2; cat "$work/noop.txt" >&2; exit 1; }
    printf '%-6s %-14s %-12s %s\n' "$n" "$mif" "$(secs "$t0" "$t1")" "$(secs "$t1" "$t2")"
    "$bosun" --state-dir "$state" -d bench delete-deployment -n >/dev/null
done
