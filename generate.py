"""Generate text from a trained MoE transformer.

Generation is not part of this version yet: for now this checks the config (file and
overrides) and reports the model it describes, then exits with status 1.
"""

from __future__ import annotations

import argparse
import sys

from moe.cli import add_config_args, describe_model, parse_args, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    args, config = parse_args(parser, argv)
    print(describe_model(config.model))
    print("generate.py: generation is not available in this version yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    run(main)
