"""Prompts in, text out: encoding a prompt (with its images), reading prompt files, and
decoding a stream of tokens into text that never shows half a UTF-8 character.

Shape letters (moe/shapes.py): M images of a prompt, C channels, W image side.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..config import VisionConfig
from ..data.captions import load_image
from ..files import read_jsonl
from ..model.vision import NO_VISION
from ..tokenizer import EOT, IMAGE
from .engine import Request
from .sampling import SamplingParams


def prompt_with_images(tokenizer: Tokenizer, text: str, image_paths: list[str | Path],
                       cfg: VisionConfig | None) -> tuple[list[int], torch.Tensor | None]:
    """(token ids, images (M, C, W, W) or None) for a prompt that starts a document.

    Each image goes where the text has an <|image|> marker; with no markers, the images come
    first, before the text.
    """
    ids = tokenizer.encode(text).ids
    image_id, eot = tokenizer.token_to_id(IMAGE), tokenizer.token_to_id(EOT)
    if not image_paths:
        return [eot, *ids], None
    if cfg is None:
        raise ValueError(NO_VISION)
    markers = ids.count(image_id)
    if markers == 0:
        ids = [image_id] * len(image_paths) + ids
    elif markers != len(image_paths):
        raise ValueError(f"the prompt has {markers} {IMAGE} markers but {len(image_paths)} images were given")
    if len(image_paths) > cfg.max_images:
        raise ValueError(f"{len(image_paths)} images in one prompt, more than model.vision.max_images={cfg.max_images}")
    return [eot, *ids], torch.stack([load_image(path, cfg) for path in image_paths])


def read_prompt_file(path: str | Path, tokenizer: Tokenizer, vision: VisionConfig | None,
                     params: SamplingParams) -> tuple[list[str], list[Request]]:
    """Prompts as text, one a line; or, in a .jsonl file, {"prompt": text, "images": [paths]} a
    line (image paths relative to the file). Returns the texts and one request each, ids 0, 1, ..."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompt-file {path}: no such file")
    if path.suffix == ".jsonl":
        prompts = []
        for number, record in read_jsonl(path, (), optional=("prompt", "images")):
            images = record.get("images", [])
            if not isinstance(images, list):
                raise ValueError(f"{path}:{number}: \"images\" must be a list of image paths, got {images!r}")
            prompts.append((str(record.get("prompt", "")), [path.parent / str(image) for image in images]))
    else:
        prompts = [(line, []) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompt-file {path}: no prompts in it (one a line)")
    requests = []
    for i, (text, images) in enumerate(prompts):
        ids, pixels = prompt_with_images(tokenizer, text, images, vision)
        requests.append(Request(ids, params, id=i, images=pixels))
    return [text for text, _ in prompts], requests


class TextStream:
    """Tokens in, newly complete text out: a character split across tokens waits for its rest."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.tokens, self.shown = tokenizer, [], ""

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence so far
            return ""
        new, self.shown = text[len(self.shown):], text
        return new

    def rest(self) -> str:
        """Whatever is left at the end (an incomplete character shown as it is)."""
        new = self.tokenizer.decode(self.tokens)[len(self.shown):]
        self.shown += new
        return new
