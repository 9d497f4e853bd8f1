"""The transfer benchmark from a source checkout: same as ``kvcache bench``
(see kvcache/bench.py for the options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvcache.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
