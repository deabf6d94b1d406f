"""Byte-level BPE tokenizer, trained with `tokenizers` on the training corpus.

Byte-level means every string round-trips exactly, so bits per byte can be measured and no
text is ever unknown. The special tokens are fixed ids 0-4, the same for every vocabulary size.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"  # separates packed documents; ends a response
PAD = "<|pad|>"
IMAGE = "<|image|>"  # where an image sits in interleaved text (vision)
USER = "<|user|>"  # instruction turns
ASSISTANT = "<|assistant|>"
SPECIAL_TOKENS = [EOT, PAD, IMAGE, USER, ASSISTANT]
IMAGE_ID = SPECIAL_TOKENS.index(IMAGE)  # special tokens have fixed ids in every vocabulary


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"model.vocab_size={vocab_size}: a byte-level BPE needs at least "
                         f"{256 + len(SPECIAL_TOKENS)} tokens (256 bytes + {len(SPECIAL_TOKENS)} special)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def instruction_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """`<|user|> prompt <|assistant|>`: an instruction turn as instruction data trains it, the
    response to follow (and end with <|endoftext|>)."""
    return [tokenizer.token_to_id(USER), *tokenizer.encode(prompt).ids, tokenizer.token_to_id(ASSISTANT)]


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer there")
    tokenizer = Tokenizer.from_file(str(path))
    missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise ValueError(f"{path}: tokenizer lacks the special tokens {', '.join(missing)}")
    moved = [f"{t} (id {tokenizer.token_to_id(t)})" for i, t in enumerate(SPECIAL_TOKENS) if tokenizer.token_to_id(t) != i]
    if moved:
        raise ValueError(f"{path}: special tokens must have ids 0-{len(SPECIAL_TOKENS) - 1} in the order "
                         f"{', '.join(SPECIAL_TOKENS)}; found {', '.join(moved)}")
    return tokenizer

