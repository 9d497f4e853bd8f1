"""The ``kvcache`` command (``python -m kvcache``):

    kvcache info [--json]      what this host offers: RDMA devices, ports, GIDs,
                               memlock, usable transports, accelerator runtimes
    kvcache bench [options]    the transfer benchmark (``kvcache bench --help``)
    kvcache demo [options]     a model served disaggregated (``kvcache demo --help``)
    kvcache --version

KVCACHE_DEBUG on prints the ``kvcache`` loggers' DEBUG lines on stderr."""
import argparse
import json
import sys

from kvcache.log import setup as setup_logging
from kvcache.status import LLMException


def _version():
    from kvcache.info import package_version
    return package_version() or "unknown (source tree, not installed)"


def _info(args, rest):
    from kvcache.info import collect, render
    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


def _bench(args, rest):
    from kvcache import bench
    bench.main(argv=rest, args=args)
    return 0


def _demo(args, rest):
    from kvcache.demo.run import run
    try:
        return run(args)
    except KeyboardInterrupt:            # the servers were stopped on the way out
        print("kvcache demo: interrupted", file=sys.stderr)
        return 130


def build_parser():
    parser = argparse.ArgumentParser(
        prog="kvcache", description="Move LLM KV cache between prefill and decode "
        "processes over RDMA, TCP or shared memory.",
        epilog="KVCACHE_DEBUG=1 prints the kvcache loggers' debug lines on stderr.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="{info,bench,demo}", required=True)
    info = commands.add_parser("info", help="RDMA devices, ports, GIDs, memlock, usable "
                               "transports and accelerator runtimes on this host",
                               description="What this host offers kvcache.")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(run=_info)
    from kvcache.bench import __doc__ as bench_doc, add_arguments
    bench = commands.add_parser("bench", help="transfer benchmark between two processes",
                                description=bench_doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(bench)
    bench.set_defaults(run=_bench)
    from kvcache.demo.run import __doc__ as demo_doc, add_arguments as demo_arguments
    demo = commands.add_parser("demo", help="prefill and decode servers behind a proxy, "
                               "checked against a single-process run",
                               description=demo_doc.split("\n\n")[0])
    demo_arguments(demo)
    demo.set_defaults(run=_demo)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        setup_logging()
        return args.run(args, argv[1:])
    except LLMException as exc:
        print(f"kvcache {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
