"""The ``kvcache`` command: ``kvcache bench [options]`` runs the transfer
benchmark (``kvcache bench --help``)."""
import sys

COMMANDS = {"bench": "kvcache.bench"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: kvcache {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    module = __import__(COMMANDS[argv[0]], fromlist=["main"])
    module.main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
