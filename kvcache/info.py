"""What this host offers kvcache (``kvcache info``): RDMA devices, their
ports and GIDs, the memlock limit, which transports are usable and why not,
and the accelerator runtimes found. Collecting never raises: whatever cannot
be read is reported with the reason."""
import ctypes.util
import importlib.metadata
import importlib.util
import os
import platform
import resource
import socket
import sys

from kvcache.rdma_support import rdma_status

# Accelerator bindings that may be installed next to pyverbs_kv, and the
# runtime library each needs (looked up with ctypes.util.find_library).
ACCELERATORS = (("cuda", "pyverbs_kv.cuda", ("cuda", "cudart")),
                ("acl", "pyverbs_kv.acl", ("ascendcl",)))


def package_version():
    """The installed distribution's version, or None in a source tree that
    was never installed."""
    try:
        return importlib.metadata.version("pyverbs-kv")
    except importlib.metadata.PackageNotFoundError:
        return None


def memlock():
    """RLIMIT_MEMLOCK (soft, hard) in bytes, None meaning unlimited."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return {key: None if value == resource.RLIM_INFINITY else value
            for key, value in (("soft_bytes", soft), ("hard_bytes", hard))}


def _port(ctx, port_num, mtu_bytes):
    attr = ctx.query_port(port_num)
    port = {"port": port_num, "state": attr["state_str"], "link_layer": attr["link_layer"],
            "active_mtu": mtu_bytes.get(attr["active_mtu"], attr["active_mtu"]),
            "gids": [], "default_gid_index": None}
    port["gids"] = [{"index": e.index, "gid": e.gid, "type": e.type,
                     "ipv4_mapped": e.ipv4_mapped, "ipv4": e.ipv4, "netdev": e.netdev}
                    for e in ctx.gid_table(port_num)]
    try:
        port["default_gid_index"] = ctx.pick_gid(port_num)
    except Exception as exc:                  # reported, as every failure here is
        port["gid_error"] = str(exc)
    return port


def rdma_devices(names):
    """Per device: firmware, ports, GIDs (or the error that stopped the query)."""
    from pyverbs_kv import Context
    from pyverbs_kv.device import MTU_BYTES
    devices = []
    for name in names:
        entry = {"name": name}
        try:
            ctx = Context(name)
            try:
                attr = ctx.query_device()
                entry["fw_ver"] = attr["fw_ver"]
                entry["ports"] = [_port(ctx, p, MTU_BYTES)
                                  for p in range(1, attr["phys_port_cnt"] + 1)]
            finally:
                ctx.close()
        except Exception as exc:
            entry["error"] = str(exc)
        devices.append(entry)
    return devices


def _shm_usable():
    """shm needs memfd_create and abstract unix sockets (Linux)."""
    try:
        os.close(os.memfd_create("kvcache-info"))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(f"\0kvcache-info-{os.getpid()}")
    except (AttributeError, OSError) as exc:
        return False, f"memfd or abstract unix sockets unavailable: {exc}"
    return True, "same-host peers: memfd-shared regions copied with memcpy"


def transports(status):
    """Usable transports with the reason, and what 'auto' picks."""
    from kvcache.llm_datadist import choose_transport
    usable, why = _shm_usable()
    name, auto_why = choose_transport("auto")
    return {"tcp": {"usable": True, "why": "any peer reachable over TCP"},
            "shm": {"usable": usable, "why": why},
            "rdma": {"usable": status.available, "why": status.reason},
            "auto": {"picks": name, "why": auto_why}}


def accelerators():
    """Accelerator bindings importable next to pyverbs_kv, and whether the
    runtime library each needs is on the loader path (nothing is imported
    or initialised: merely looking must not start a device)."""
    found = []
    for name, module, libraries in ACCELERATORS:
        try:
            binding = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):     # pyverbs_kv itself does not load
            binding = False
        libs = {lib: ctypes.util.find_library(lib) for lib in libraries}
        found.append({"name": name, "binding": module if binding else None,
                      "runtime_libraries": libs,
                      "usable": binding and all(libs.values())})
    return found


def collect():
    """Everything ``kvcache info`` shows, as a JSON-serialisable dict."""
    status = rdma_status()
    return {
        "version": package_version(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "memlock": memlock(),
        "rdma": {"available": status.available, "reason": status.reason,
                 "devices": rdma_devices(status.devices) if status.devices else []},
        "transports": transports(status),
        "accelerators": accelerators(),
        "environment": {k: "(set, not shown)" if k == "KVCACHE_AUTH_KEY" else v
                        for k, v in sorted(os.environ.items()) if k.startswith("KVCACHE_")},
    }


def _bytes(value):
    return "unlimited" if value is None else f"{value} bytes ({value / (1 << 20):.1f} MiB)"


def render(info):
    """``collect()``'s dict as the text ``kvcache info`` prints."""
    lines = [f"pyverbs-kv {info['version'] or '(not installed; source tree)'}, "
             f"Python {info['python']}, {info['platform']}",
             f"memlock limit: soft {_bytes(info['memlock']['soft_bytes'])}, "
             f"hard {_bytes(info['memlock']['hard_bytes'])} (RDMA registrations count "
             "against it; tcp and shm do not)",
             "", "transports:"]
    for name in ("tcp", "shm", "rdma"):
        t = info["transports"][name]
        lines.append(f"  {name:<5} {'usable' if t['usable'] else 'NOT usable'}: {t['why']}")
    auto = info["transports"]["auto"]
    lines += [f"  auto  picks {auto['picks']} ({auto['why']})", "", "RDMA devices:"]
    if not info["rdma"]["devices"]:
        lines.append(f"  none ({info['rdma']['reason']})")
    for dev in info["rdma"]["devices"]:
        if "error" in dev:
            lines.append(f"  {dev['name']}: {dev['error']}")
            continue
        lines.append(f"  {dev['name']} (firmware {dev['fw_ver'] or '-'})")
        for port in dev["ports"]:
            lines.append(f"    port {port['port']}: {port['state']}, {port['link_layer']}, "
                         f"MTU {port['active_mtu']}, default GID index "
                         f"{port['default_gid_index']}"
                         + (f" ({port['gid_error']})" if "gid_error" in port else ""))
            for g in port["gids"]:
                lines.append(f"      GID[{g['index']}] {g['gid']}  {g['type']}"
                             f"{'  IPv4-mapped ' + g['ipv4'] if g['ipv4_mapped'] else ''}"
                             f"  netdev {g['netdev'] or '-'}")
    lines += ["", "accelerator runtimes:"]
    for acc in info["accelerators"]:
        libs = ", ".join(f"{k}: {v or 'not found'}" for k, v in acc["runtime_libraries"].items())
        lines.append(f"  {acc['name']:<5} binding {acc['binding'] or 'not installed'}; {libs}")
    if info["environment"]:
        lines += ["", "KVCACHE_* set: " + ", ".join(f"{k}={v}" for k, v in
                                                    info["environment"].items())]
    return "\n".join(lines)
