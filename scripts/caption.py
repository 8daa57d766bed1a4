"""Batch captioning: the same as `vlm caption` (see `python scripts/caption.py --help`)."""

import sys

from vlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["caption", *sys.argv[1:]]))
