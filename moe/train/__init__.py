"""Training, floor 4.

    trainer      the loop: schedules, accumulation, logging, evaluation, non-finite steps
    evaluate     caption accuracy of the vision branch
    distributed  torchrun: DDP, ZeRO-1, FSDP2, expert parallelism, the dp x pp x tp mesh, whole checkpoints
    pipeline     pipeline parallelism: the model cut into stages, run on a schedule
    launch       what train.py runs: a new run, a resumed one, or one started from another's weights
"""
