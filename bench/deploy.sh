#!/usr/bin/env bash
# Times a fresh deploy and a no-op redeploy of N kv instances for each N
# given (default: 3 30 100), on the local CPI or, with CPI=docker, on Docker
# (stemcell: $BOSUN_TEST_STEMCELL, else built with build-stemcell). Packages
# are compiled once before the timings (the targets are "after the first
# compile"). Also reports VM create-to-agent-ready latency (median, max).
# Usage: [CPI=docker] bench/deploy.sh [N...]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q
bosun=target/debug/bosun
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(3 30 100)

work=$(mktemp -d)
state="$work/state"
cleanup() {
    "$bosun" --state-dir "$state" -d bench delete-deployment -n >/dev/null 2>&1 || true
    if [ "${CPI:-local}" = docker ]; then
        for v in $(docker volume ls -q --filter label=bosun.deployment=bench); do docker volume rm "$v" >/dev/null; done
        for i in $("$bosun" --state-dir "$state" stemcells --json 2>/dev/null | python3 -c 'import json,sys; [print(s["cid"]) for s in json.load(sys.stdin) if s["cpi"]=="docker"]'); do docker rmi -f "$i" >/dev/null; done
    fi
    rm -rf "$work"
}
trap cleanup EXIT

host_os=$(. /etc/os-release && echo "$ID-$VERSION_CODENAME")
cpi=${CPI:-local}
if [ "$cpi" = docker ]; then
    range=10.244.90.0/23; gateway=10.244.90.1
    stemcell=${BOSUN_TEST_STEMCELL:-$work/stemcell.tgz}
    [ -f "$stemcell" ] || "$bosun" build-stemcell --out "$stemcell" >/dev/null
    "$bosun" --state-dir "$state" upload-stemcell "$stemcell" >/dev/null
else
    range=127.90.0.0/23; gateway=127.90.0.1
fi
cat > "$work/cc.yml" <<CC
azs:
- name: z1
  cpi: $cpi
networks:
- name: bench
  type: manual
  subnets:
  - range: $range
    gateway: $gateway
    azs: [z1]
vm_types:
- name: default
disk_types:
- name: default
  disk_size: 64
compilation:
  workers: 2
  az: z1
  network: bench
CC
"$bosun" --state-dir "$state" update-cloud-config "$work/cc.yml" >/dev/null
os=$host_os
[ "$cpi" = docker ] && os=debian-bookworm

manifest() {
cat > "$work/m.yml" <<M
name: bench
releases:
- name: kv
  version: latest
  path: $PWD/releases/kv
stemcells:
- alias: default
  os: $os
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
  - name: bench
  jobs:
  - name: kv
    release: kv
M
}

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }

# Compile once.
manifest 1 1
"$bosun" --state-dir "$state" deploy "$work/m.yml" -n >/dev/null
"$bosun" --state-dir "$state" -d bench delete-deployment -n >/dev/null

# Create-to-agent-ready per VM, from the deploy's progress lines.
ready_latency() {
    python3 - "$1" <<'PY'
import re, sys, statistics
t = {}
lat = []
for line in open(sys.argv[1]):
    m = re.match(r"\s*([0-9.]+)s\s+(\S+ \S+)\s+(.*)$", line)
    if not m:
        continue
    ts, who, stage = float(m.group(1)), m.group(2), m.group(3).strip()
    if stage == "creating VM":
        t[who] = ts
    elif who in t and stage not in ("waiting for agent",):
        lat.append(ts - t.pop(who))
print(f"{statistics.median(lat):.2f} {max(lat):.2f}" if lat else "- -")
PY
}

echo "CPI: $cpi"
printf '%-6s %-14s %-10s %-8s %s\n' N max_in_flight fresh_s noop_s "agent_ready_s(median max)"
for n in "${sizes[@]}"; do
    # max_in_flight: 1 for the quickstart shape, 10 % of N (at least 1) otherwise.
    mif=$(( n <= 3 ? 1 : (n + 9) / 10 ))
    manifest "$n" "$mif"
    t0=$(now); "$bosun" --state-dir "$state" deploy "$work/m.yml" -n >"$work/fresh.txt"; t1=$(now)
    "$bosun" --state-dir "$state" deploy "$work/m.yml" -n >"$work/noop.txt"; t2=$(now)
    grep -q "no changes" "$work/noop.txt" || { echo "no-op redeploy changed something" >&2; cat "$work/noop.txt" >&2; exit 1; }
    printf '%-6s %-14s %-10s %-8s %s\n' "$n" "$mif" "$(secs "$t0" "$t1")" "$(secs "$t1" "$t2")" "$(ready_latency "$work/fresh.txt")"
    "$bosun" --state-dir "$state" -d bench delete-deployment -n >/dev/null
done
