#!/usr/bin/env bash
# Runs as root inside the VM started by scripts/rdma-vm: brings up rxe0, then
# runs the command. Arguments: REPO OUT TIMEOUT COMMAND...
set -u
repo=$1 out=$2 timeout_s=$3
shift 3

modprobe rdma_rxe || { echo "rdma-vm: modprobe rdma_rxe failed" >&2; exit 97; }
modprobe rdma_ucm 2>/dev/null || true
ip link set lo up
ip link add dum0 type dummy
ip addr add 10.99.0.1/24 dev dum0
ip link set dum0 up
rdma link add rxe0 type rxe netdev dum0 || { echo "rdma-vm: rdma link add failed" >&2; exit 97; }
for _ in $(seq 50); do
    [ -e /sys/class/infiniband/rxe0 ] && break
    sleep 0.1
done
if [ ! -e /sys/class/infiniband/rxe0 ]; then
    echo "rdma-vm: rxe0 did not appear" >&2
    exit 97
fi
ulimit -l unlimited
echo "rdma-vm: rxe0 up on dum0 10.99.0.1 ($(uname -r))" >&2

cd "$repo"
export PATH="$repo/.venv/bin:$PATH"
export PYTHONDONTWRITEBYTECODE=1
export PYVERBS_KV_REQUIRE_RDMA=1          # rdma tests fail, not skip, without a device
export PYVERBS_KV_TEST_IP=10.99.0.1
export RDMA_VM_OUT="$out"
export HOME=/tmp
timeout --kill-after=10 "$timeout_s" "$@"
