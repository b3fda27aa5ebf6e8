"""`ringlet bench` without the CLI's other subcommands (a GPU box may lack the server's packages).

Usage: python scripts/bench_gpu.py --shape llama-3.1-8b --engine cuda --baseline transformers
"""

import argparse
import logging
import sys

from ringlet.cli import bench

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # what the engine chose while loading
parser = argparse.ArgumentParser(prog="ringlet")
bench.register(parser.add_subparsers(dest="command"))
args = parser.parse_args(["bench", *sys.argv[1:]])
sys.exit(args.func(args))
