"""Benchmarks and the cost model: `python bench.py --help` lists the commands, `python bench.py
COMMAND --help` explains each (moe/bench/commands.py)."""

from moe.bench.commands import main
from moe.cli import run

if __name__ == "__main__":
    run(main)
