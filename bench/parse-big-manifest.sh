#!/usr/bin/env bash
# Times reading a big manifest (default ~50 MB: instance groups of 1000
# properties each) with the bosun binary: `bosun interpolate`, and
# `bosun deploy --dry-run` on a scratch state (parse, cloud-config checks,
# desired state and plan; the groups have no instances, so nothing is
# rendered), for three variants: valid, a duplicate key on the last line
# (refused by the parser) and `instances: 10000000` in the last group
# (refused by the cloud-config checks). Prints seconds and peak memory.
# The target is under 5 s for 50 MB in a release build.
# Usage: [PROFILE=release] [SIZE_MB=50] bench/parse-big-manifest.sh
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-debug}
if [ "$profile" = release ]; then cargo build -q --release; else cargo build -q; fi
bosun=$PWD/target/$profile/bosun
size=${SIZE_MB:-50}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
host_os=$(. /etc/os-release && echo "$ID-$VERSION_CODENAME")

for variant in ok dup huge; do
    python3 - "$PWD/releases/kv" "$host_os" "$size" "$variant" > "$work/$variant.yml" <<'PY'
import sys
release, os_, size_mb, variant = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
head = f"""name: big
releases:
- name: kv
  version: latest
  path: {release}
stemcells:
- alias: default
  os: {os_}
  version: latest
update:
  canaries: 1
  max_in_flight: 1
  canary_watch_time: 1000
  update_watch_time: 1000
instance_groups:
"""
out, size, g = [head], len(head), 0
while size < size_mb * 1e6:
    lines = [f"- name: g{g}\n  instances: 0\n  azs: [z1]\n  vm_type: default\n  stemcell: default\n"
             "  networks:\n  - name: default\n  jobs:\n  - name: kv\n    release: kv\n"
             "    properties:\n      kv:\n        port: 8080\n        extra:\n"]
    lines += [f"          key{k}: value-{g}-{k}-0123456789\n" for k in range(1000)]
    text = "".join(lines)
    out.append(text)
    size += len(text)
    g += 1
if variant == "dup":
    out.append("          key7: again\n")
elif variant == "huge":
    out[-1] = out[-1].replace("  instances: 0\n", "  instances: 10000000\n", 1)
sys.stdout.write("".join(out))
PY
done

# Seconds, peak memory and exit status of one run, and the first error naming the file.
timed() {
    local what=$1; shift
    local t0 t1 rc=0
    t0=$(date +%s.%N)
    /usr/bin/time -f "%M" -o "$work/mem" "$@" >/dev/null 2>"$work/err" || rc=$?
    t1=$(date +%s.%N)
    printf '%-26s %6.2f s %7d MiB  exit %d  %s\n' "$what" "$(python3 -c "print($t1 - $t0)")" \
        "$(( $(tail -1 "$work/mem") / 1024 ))" "$rc" "$(grep -m1 -F .yml "$work/err" | sed "s#$work/##" | cut -c1-150 || true)"
}

echo "bosun: $profile build; manifest: $(( $(stat -c %s "$work/ok.yml") / 1000000 )) MB, $(wc -l < "$work/ok.yml") lines"
for variant in ok dup huge; do
    timed "interpolate $variant" "$bosun" interpolate "$work/$variant.yml"
    timed "deploy --dry-run $variant" "$bosun" --state-dir "$work/state" deploy "$work/$variant.yml" --dry-run
done
