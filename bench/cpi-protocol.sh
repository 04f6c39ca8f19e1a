#!/usr/bin/env bash
# Per-call overhead of the external CPI protocol versus the built-in local
# backend: create_vm and has_vm, median and p90 over N calls (default 100).
# Run as root (local VMs need namespaces). Usage: bench/cpi-protocol.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
CALLS=${1:-100} cargo bench -q --profile dev --bench cpi_protocol
