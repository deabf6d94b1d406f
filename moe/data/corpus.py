"""Text data: sources read once, tokenised once into memory-mapped arrays, sampled statelessly.

A source is a list of documents: the built-in `docs` (the English text of `pydoc_data.topics`),
`code` (the standard library's .py files), or local .txt / .jsonl / .parquet files read with
`datasets`. Each source is tokenised into one stream of tokens, documents separated by
<|endoftext|>, and its tail is held out for validation. Both are cached as .npy files keyed by
the corpus and the tokenizer, so a restart or a second run reads them back instead of
re-tokenising.

Sampling is stateless: training sequence j is drawn by a generator seeded with (seed, j), so a
resumed run only needs the number of sequences drawn so far to continue exactly.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import random
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from ..config import DataConfig, ModelConfig
from ..files import atomic_write, read_jsonl
from ..tokenizer import EOT, PAD, instruction_prompt, load_tokenizer, train_tokenizer
from .batches import Batch
from .captions import CaptionData

BUILTIN_SOURCES = ("docs", "code")
FILE_KINDS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


# ---- reading sources ------------------------------------------------------------------------

def source_files(name: str) -> list[Path]:
    """The files behind a source, sorted (empty for `docs`)."""
    if name == "docs":
        return []
    if name == "code":
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        return sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    path = Path(name).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in FILE_KINDS and p.is_file())
        if not files:
            raise FileNotFoundError(f"data source {name}: no {', '.join(FILE_KINDS)} files in this directory")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"data source {name}: no such file or directory (built-in sources: docs, code)")
    if path.suffix not in FILE_KINDS:
        raise ValueError(f"data source {name}: unsupported file type {path.suffix!r} (expected {', '.join(FILE_KINDS)})")
    return [path]


def read_documents(name: str, text_field: str = "text") -> list[str]:
    if name == "docs":
        import pydoc_data.topics

        return list(pydoc_data.topics.topics.values())
    if name == "code":
        return [p.read_text(encoding="utf-8", errors="replace") for p in source_files(name)]
    documents = []
    for path in source_files(name):
        documents += _read_with_datasets(path, text_field)
    documents = [d for d in documents if d]
    if not documents:
        raise ValueError(f"data source {name}: no text in it")
    return documents


def _read_with_datasets(path: Path, text_field: str) -> list[str]:
    import datasets

    kind = FILE_KINDS[path.suffix]
    options = {"sample_by": "document"} if kind == "text" else {}
    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train", **options)
    except Exception as e:  # datasets wraps decoding and schema errors in many types
        cause = e
        while cause is not None and not isinstance(cause, UnicodeDecodeError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise ValueError(f"{path}: not UTF-8 text (byte {cause.start}: {cause.reason})") from None
        raise ValueError(f"{path}: cannot read it as {kind} ({type(e).__name__}: {e})") from None
    if kind == "text":
        text_field = "text"
    if text_field not in table.column_names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(table.column_names)}); "
                         f"set data.text_field")
    return [t for t in table[text_field] if isinstance(t, str)]


def source_fingerprint(name: str) -> str:
    """Changes when the source's content may have changed (paths, sizes, modification times)."""
    h = hashlib.sha256(name.encode())
    if name == "docs":
        h.update(sys.version.encode())
    for path in source_files(name):
        stat = path.stat()
        h.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


# ---- tokenizer and token cache --------------------------------------------------------------

def cache_root(cfg: DataConfig) -> Path:
    return Path(os.path.expanduser(cfg.cache_dir))


Say = Callable[[str], None] | None  # where a first run's slow stages are announced (None: nowhere)


@contextlib.contextmanager
def stage(say: Say, what: str) -> Iterator[None]:
    """Announce a slow one-off step of a first run (training the tokenizer, tokenising a source),
    then how long it took."""
    if say is None:
        yield
        return
    say(f"{what} ...")
    start = time.perf_counter()
    yield
    say(f"{what}: done in {time.perf_counter() - start:.1f} s")


def build_tokenizer(cfg: DataConfig, vocab_size: int, documents: Callable[[str], list[str]],
                    say: Say = None) -> Tokenizer:
    """Train a BPE tokenizer on a sample of the sources, or reuse the one cached for them."""
    names = list(cfg.sources) or ["docs"]
    key = hashlib.sha256(json.dumps([sorted(source_fingerprint(n) for n in names), vocab_size,
                                     cfg.tokenizer_sample_mb]).encode()).hexdigest()[:16]
    path = cache_root(cfg) / "tokenizers" / f"bpe-{vocab_size}-{key}.json"
    if path.is_file():
        return load_tokenizer(path)
    budget = cfg.tokenizer_sample_mb * 1e6 / len(names)  # characters per source
    with stage(say, f"training a {vocab_size:,}-token BPE tokenizer on {cfg.tokenizer_sample_mb:g} MB of "
                    f"{', '.join(names)} (once: it is cached in {path.parent})"):
        sample = []
        for name in names:
            docs = documents(name)
            taken = 0
            for doc in random.Random(0).sample(docs, len(docs)):
                if taken >= budget:
                    break
                sample.append(doc)
                taken += len(doc)
        tokenizer = train_tokenizer(sample, vocab_size)
        atomic_write(path, tokenizer.to_str().encode())
    return tokenizer


def tokenize_source(cfg: DataConfig, name: str, documents: Callable[[str], list[str]], tokenizer: Tokenizer,
                    say: Say = None) -> dict:
    """Token arrays of one source, from the cache if there: {train, val, val_bytes}."""
    tok_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]
    folder = cache_root(cfg) / "tokens" / f"{source_fingerprint(name)}-{tok_hash}-{cfg.val_fraction}"
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        with stage(say, f"reading and tokenising source {name} (once: it is cached in {folder.parent})"):
            _tokenize(cfg, name, documents, tokenizer, folder)
    meta = json.loads(meta_path.read_text())
    return {
        "train": np.load(folder / "train.npy", mmap_mode="r"),
        "val": np.load(folder / "val.npy", mmap_mode="r"),
        "val_bytes": meta["val_bytes"],
        "folder": folder,
    }


def _tokenize(cfg: DataConfig, name: str, documents: Callable[[str], list[str]], tokenizer: Tokenizer,
              folder: Path) -> None:
    """Tokenise a source into folder/{train,val}.npy and meta.json (written last: its presence
    says the rest is there)."""
    docs = documents(name)
    docs = random.Random(0).sample(docs, len(docs))  # so the held-out tail mixes many documents
    eot = tokenizer.token_to_id(EOT)
    ids = [i for enc in tokenizer.encode_batch(docs) for i in (*enc.ids, eot)]
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32
    tokens = np.asarray(ids, dtype=dtype)
    n_val = max(int(len(tokens) * cfg.val_fraction), 1)
    train, val = tokens[:-n_val], tokens[-n_val:]
    val_bytes = len(tokenizer.decode(val.tolist(), skip_special_tokens=False).encode("utf-8"))
    folder.mkdir(parents=True, exist_ok=True)
    for split, array in (("train", train), ("val", val)):
        atomic_write(folder / f"{split}.npy", _npy_bytes(array))
    atomic_write(folder / "meta.json", json.dumps({"source": name, "train_tokens": len(train),
                                                   "val_tokens": len(val), "val_bytes": val_bytes}).encode())


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# ---- sampling -------------------------------------------------------------------------------

class PretrainData:
    """The packed token streams of all sources, sampled in proportion to tokens x epochs."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, documents: Callable[[str], list[str]], seed: int = 0,
                 say: Say = None):
        self.seed = seed
        self.names = list(cfg.sources)
        streams = [tokenize_source(cfg, name, documents, tokenizer, say) for name in self.names]
        self.train = [s["train"] for s in streams]
        self.val = [s["val"] for s in streams]
        self.val_bytes = sum(s["val_bytes"] for s in streams)
        weights = np.array([len(t) * cfg.sources[n] for t, n in zip(self.train, self.names)], dtype=np.float64)
        self.weights = weights / weights.sum()

    @property
    def bytes_per_token(self) -> float:
        return self.val_bytes / sum(len(v) for v in self.val)

    def batch(self, first: int, n: int, seq_len: int, split: str = "train") -> Batch:
        """Sequences first .. first + n - 1 of the split, each a window of seq_len + 1 tokens."""
        streams = self.train if split == "train" else self.val
        rows = []
        for j in range(first, first + n):
            rng = np.random.default_rng([self.seed, j, split == "val"])
            s = rng.choice(len(streams), p=self.weights)  # validation mixes sources as training does
            stream = streams[s]
            if len(stream) < seq_len + 2:
                raise ValueError(f"data source {self.names[s]}: {len(stream)} {split} tokens, "
                                 f"fewer than one sequence of {seq_len + 1}")
            start = rng.integers(0, len(stream) - seq_len - 1)
            rows.append(np.asarray(stream[start:start + seq_len + 1], dtype=np.int64))
        window = torch.from_numpy(np.stack(rows))
        return Batch(window[:, :-1], window[:, 1:].clone())


class InstructData:
    """Prompt/response pairs as `<|user|> prompt <|assistant|> response <|endoftext|>`, loss on the response."""

    def __init__(self, path: str | Path, tokenizer: Tokenizer, val_fraction: float, seed: int = 0):
        self.seed = seed
        self.tokenizer = tokenizer
        path = Path(path).expanduser()
        try:
            records = read_jsonl(path, ("prompt", "response"))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"data.instruct {e}") from None
        examples = [(str(r["prompt"]), str(r["response"])) for _, r in records]
        if len(examples) < 2:
            raise ValueError(f"{path}: needs at least 2 examples (one is held out), found {len(examples)}")
        n_val = max(int(len(examples) * val_fraction), 1)
        self.train, self.val = examples[:-n_val], examples[-n_val:]
        self.val_bytes = sum(len(r.encode()) for _, r in self.val)
        self.val_tokens = sum(len(self.encode(p, r)[1]) - len(self.encode(p, "")[1]) for p, r in self.val)

    @property
    def bytes_per_token(self) -> float:
        return self.val_bytes / max(self.val_tokens, 1)

    def encode(self, prompt: str, response: str) -> tuple[list[int], list[bool]]:
        """Token ids and, per token, whether the loss is taken on it (the response and its end)."""
        t = self.tokenizer
        head = instruction_prompt(t, prompt)
        tail = [*t.encode(response).ids, t.token_to_id(EOT)] if response else []
        return head + tail, [False] * len(head) + [True] * len(tail)

    def example_tensors(self, prompt: str, response: str, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, loss_on = self.encode(prompt, response)
        ids, loss_on = ids[: seq_len + 1], loss_on[: seq_len + 1]
        pad = seq_len + 1 - len(ids)
        ids = ids + [self.tokenizer.token_to_id(PAD)] * pad
        loss_on = loss_on + [False] * pad
        tokens = torch.tensor(ids)
        targets = torch.where(torch.tensor(loss_on[1:]), tokens[1:], -100)
        return tokens[:-1], targets

    def batch(self, first: int, n: int, seq_len: int, split: str = "train") -> Batch:
        examples = self.train if split == "train" else self.val
        pairs = []
        for j in range(first, first + n):
            rng = np.random.default_rng([self.seed, j, split == "val"])
            pairs.append(self.example_tensors(*examples[rng.integers(len(examples))], seq_len))
        return Batch(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))


def document_reader(cfg: DataConfig) -> Callable[[str], list[str]]:
    """`documents(name)`, reading each source at most once, and only if a cache misses."""
    return functools.cache(lambda name: read_documents(name, cfg.text_field))


def prepare_data(cfg: DataConfig, model: ModelConfig, seed: int, tokenizer: Tokenizer | None = None,
                 say: Say = None):
    """(tokenizer, data): the given tokenizer or a trained/cached one; image-caption, instruct or
    pretraining data."""
    if cfg.images and model.vision is None:
        raise ValueError(f"data.images={cfg.images!r} needs a model with a vision branch (a [model.vision] section)")
    documents = document_reader(cfg)
    tokenizer = tokenizer or build_tokenizer(cfg, model.vocab_size, documents, say)
    if tokenizer.get_vocab_size() != model.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but model.vocab_size={model.vocab_size}")
    if cfg.images:
        return tokenizer, CaptionData(cfg, model.vision, tokenizer, seed)
    if cfg.instruct:
        return tokenizer, InstructData(cfg.instruct, tokenizer, cfg.val_fraction, seed)
    return tokenizer, PretrainData(cfg, tokenizer, documents, seed, say)
