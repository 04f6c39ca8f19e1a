#!/usr/bin/env python3
"""Times the health monitor: detection and full recovery of a 3-instance kv
deployment (default health settings) for each fault, several rounds.

Local CPI (default), faults:
  process  kill -9 of the kv server (the agent restarts it)
  vm       kill -9 of the agent and every process of the VM (lost VM)
  silent   SIGSTOP of the agent (alive, silent, still holding its disk)
Docker (CPI=docker, stemcell from $BOSUN_TEST_STEMCELL or built):
  vm       docker rm -f of the container
  silent   docker pause of the container

Detection: first monitor event about the instance after the fault.
Recovery: until the instance serves the key written before the fault (and,
for vm/silent, runs on a new VM).

Usage: [CPI=docker] bench/heal.py [ROUNDS]   (default 3)
"""
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOSUN = os.path.join(ROOT, "target/debug/bosun")
CPI = os.environ.get("CPI", "local")
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3


def run(*args, check=True):
    out = subprocess.run([BOSUN, "--state-dir", STATE, *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        sys.exit(f"bosun {' '.join(args)} failed:\n{out.stdout}{out.stderr}")
    return out.stdout


def instances():
    return json.loads(run("-d", "heal", "instances", "--json"))


def events():
    return json.loads(run("-d", "heal", "events", "--json"))


def http(method, ip, path, body=None, timeout=1.0):
    req = urllib.request.Request(f"http://{ip}:8080{path}", data=body, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read().decode()


def by_index(i):
    return next(x for x in instances() if x["index"] == i)


def descendants(pid):
    kids = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            stat = open(f"/proc/{p}/stat").read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmd = open(f"/proc/{p}/cmdline").read().replace("\0", " ")
        except OSError:
            continue
        kids.setdefault(ppid, []).append((int(p), cmd))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c[0])
    return out


def vm_pid(cid):
    return int(open(f"{STATE}/local-cpi/vms/{cid}/pid").read().strip())


def fault(kind, inst):
    cid = inst["vm_cid"]
    if CPI == "docker":
        subprocess.run(["docker", "rm" if kind == "vm" else "pause"] + (["-f"] if kind == "vm" else []) + [cid], check=True, capture_output=True)
        return
    agent = vm_pid(cid)
    if kind == "process":
        pid = next(p for p, c in descendants(agent) if "server.py" in c)
        os.kill(pid, signal.SIGKILL)
    elif kind == "vm":
        for p in [agent] + [p for p, _ in descendants(agent)]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    else:
        inner = next(p for p, c in descendants(agent) if " agent " in c)
        os.kill(inner, signal.SIGSTOP)


def measure(kind, index, round_no):
    inst = by_index(index)
    ip = inst["ips"][0]
    key = f"/kv/{kind}{round_no}"
    http("PUT", ip, key, b"v")
    last = max([e["id"] for e in events()] or [0])
    t0 = time.time()
    fault(kind, inst)
    recovered = None
    while time.time() - t0 < 120:
        try:
            ok = http("GET", ip, key, timeout=0.3) == (200, "v")
        except Exception:
            ok = False
        if ok and kind != "process":
            now = by_index(index)
            ok = now["vm_cid"] not in (None, inst["vm_cid"]) and now["process_state"] == "running"
        if ok and kind == "process":
            agent = vm_pid(inst["vm_cid"]) if CPI == "local" else None
            ok = agent is None or any("server.py" in c for _, c in descendants(agent))
        if ok:
            recovered = time.time() - t0
            break
        time.sleep(0.05)
    prefix = f"kv/{inst['id']}"
    seen = []
    for _ in range(50):  # the monitor may notice after the agent already healed it
        seen = [e for e in events() if e["id"] > last and e["source"] == "monitor" and (e["instance"] or "").startswith(prefix)]
        if seen:
            break
        time.sleep(0.1)
    detect = (seen[0]["time_ms"] / 1000 - t0) if seen else None
    if recovered is None:
        sys.exit(f"{kind}: not recovered within 120 s; events: {json.dumps(seen, indent=1)}")
    # Let the monitor settle (quiet period) before the next fault.
    time.sleep(11 if kind != "process" else 2)
    return detect, recovered


def main():
    global STATE
    subprocess.run(["cargo", "build", "-q"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp()
    STATE = os.path.join(work, "state")
    host_os = "-".join(
        dict(l.strip().split("=", 1) for l in open("/etc/os-release") if "=" in l)[k].strip('"')
        for k in ("ID", "VERSION_CODENAME")
    )
    monitor = None
    try:
        if CPI == "docker":
            rng, gw, os_name = "10.244.91", "10.244.91.1", "debian-bookworm"
            stemcell = os.environ.get("BOSUN_TEST_STEMCELL") or os.path.join(work, "stemcell.tgz")
            if not os.path.exists(stemcell):
                subprocess.run([BOSUN, "build-stemcell", "--out", stemcell], check=True, capture_output=True)
            run("upload-stemcell", stemcell)
        else:
            rng, gw, os_name = "127.91.0", "127.91.0.1", host_os
        open(f"{work}/cc.yml", "w").write(f"""azs:
- name: z1
  cpi: {CPI}
networks:
- name: default
  type: manual
  subnets:
  - range: {rng}.0/24
    gateway: {gw}
    azs: [z1]
vm_types:
- name: default
disk_types:
- name: default
  disk_size: 1024
compilation:
  workers: 2
  az: z1
  network: default
""")
        run("update-cloud-config", f"{work}/cc.yml")
        open(f"{work}/m.yml", "w").write(f"""name: heal
releases:
- name: kv
  version: latest
  path: {ROOT}/releases/kv
stemcells:
- alias: default
  os: {os_name}
  version: latest
update:
  canaries: 1
  max_in_flight: 1
  canary_watch_time: 300-30000
  update_watch_time: 300-30000
instance_groups:
- name: kv
  instances: 3
  azs: [z1]
  vm_type: default
  stemcell: default
  persistent_disk: 1024
  networks:
  - name: default
  jobs:
  - name: kv
    release: kv
    properties:
      kv: {{port: 8080}}
""")
        run("deploy", f"{work}/m.yml", "-n")
        monitor = subprocess.Popen([BOSUN, "--state-dir", STATE, "-d", "heal", "monitor"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)
        kinds = ["vm", "silent"] if CPI == "docker" else ["process", "vm", "silent"]
        results = {k: [] for k in kinds}
        for r in range(ROUNDS):
            for n, k in enumerate(kinds):
                results[k].append(measure(k, n % 3, r))
        print(f"health monitor, {CPI} CPI, {ROUNDS} rounds, default health settings "
              "(heartbeat 1 s, agent_timeout 5 s)")
        print(f"{'fault':<10} {'detect median':>14} {'detect max':>11} {'recover median':>15} {'recover max':>12}")
        for k, rs in results.items():
            d = [x for x, _ in rs if x is not None]
            v = [y for _, y in rs]
            print(f"{k:<10} {statistics.median(d):>13.2f}s {max(d):>10.2f}s {statistics.median(v):>14.2f}s {max(v):>11.2f}s")
    finally:
        if monitor:
            monitor.terminate()
            monitor.wait()
        subprocess.run([BOSUN, "--state-dir", STATE, "-d", "heal", "delete-deployment", "-n"], capture_output=True)
        if CPI == "docker":
            vols = subprocess.run(["docker", "volume", "ls", "-q", "--filter", "label=bosun.deployment=heal"], capture_output=True, text=True).stdout.split()
            for v in vols:
                subprocess.run(["docker", "volume", "rm", v], capture_output=True)
            try:
                for s in json.loads(run("stemcells", "--json", check=False) or "[]"):
                    if s["cpi"] == "docker":
                        subprocess.run(["docker", "rmi", "-f", s["cid"]], capture_output=True)
            except json.JSONDecodeError:
                pass
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
