"""``gds-kvcache`` command: ``demo`` (default), ``info``, ``bench``, ``bench-kernels``, ``bench-alloc``."""

from __future__ import annotations

import importlib
import logging
import sys

__all__ = ["main"]

COMMANDS = {
    "demo": "gds_kvcache.demo",
    "info": "gds_kvcache.bench.info",
    "bench": "gds_kvcache.bench.storage",
    "bench-kernels": "gds_kvcache.bench.kernels",
    "bench-alloc": "gds_kvcache.bench.alloc",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in ("-h", "--help"):
        print("usage: gds-kvcache [" + "|".join(COMMANDS) + "] [options]\n"
              "With no command, runs the demo (the main job). Each command takes --help.")
        return 0
    cmd = argv.pop(0) if argv and argv[0] in COMMANDS else "demo"
    return importlib.import_module(COMMANDS[cmd]).main(argv)
