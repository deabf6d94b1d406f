"""Benchmarks, floor 5: measurements read against the machine's roofline (`moe.hardware`) and the
cost model (`moe.costmodel`).

    benchmarks  the measurements: MoE layer, train step, decode sweep, batching, speculative
    claims      the reference design's arithmetic, claim by claim, with verdicts
    plots       the pictures of the results (the `plot` extra)
    commands    what bench.py runs
"""
