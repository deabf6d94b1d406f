"""Train an MoE transformer.

The training loop is not part of this version yet: for now this checks the config (file and
overrides) and reports the model it describes, then exits with status 1.
"""

from moe.cli import placeholder_main, run

if __name__ == "__main__":
    run(placeholder_main(__doc__, "the training loop"))
