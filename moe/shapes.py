"""The shape letters, one legend for the whole package.

A tensor's name ends in its shape: `x_BTD` is (batch, time, model width), `k_SGXDh` one layer of a KV
cache's keys. Each letter below has one meaning everywhere; `tests/test_layout.py` checks that
every shape suffix in the package is spelled from this table.
"""

LETTERS = {
    "A": "assignments kept by dispatch: (token, expert) pairs, T * K when dropless",
    "B": "batch: the rows of one forward",
    "C": "image channels",
    "D": "model width (d_model)",
    "Dh": "attention head dim",
    "Dv": "the vision encoder's width (d_vision)",
    "E": "experts of one MoE layer",
    "F": "expert hidden size (d_ff)",
    "G": "key/value heads (n_kv_heads)",
    "H": "query heads",
    "I": "images, any set of them, flattened",
    "J": "keys a cross-attention reads (its context)",
    "K": "experts chosen per token (top-k)",
    "L": "latents: visual tokens per image",
    "M": "images one sequence may hold (max_images)",
    "N": "layers",
    "O": "outputs of a weight matrix (its rows, as nn.Linear stores them)",
    "P": "patches per image",
    "Q": "ranks of an expert-parallel group",
    "R": "rows a rank receives from the others (expert parallelism)",
    "S": "slots: the sequences a KV cache holds",
    "T": "time: positions, or tokens (batch and time flattened in MoE code)",
    "U": "experts one rank holds under expert parallelism (E / Q)",
    "V": "vocabulary",
    "W": "image side in pixels",
    "X": "cache capacity: positions per slot",
    "Z": "inputs of a weight matrix (its columns)",
    "1": "a dimension of size 1, for broadcasting",
}
