"""Image-caption data for the vision branch: synthetic sets made on the fly (seeded, nothing is
downloaded) whose captions cannot be guessed without looking, and real pairs from a folder.

`data.images` picks the set:
    digits  a number from 0 to 999 rendered in a random size, colour and place; the caption is the
            number (transcription, as in the reference design's rendered-text data)
    shapes  a circle, square or triangle in one of 6 colours, anywhere: "red circle" (18 captions)
    scenes  the same in one of 4 quadrants, named: "red circle top left" (72 captions)
    mixed   digits or shapes, half and half
    FOLDER  a directory holding captions.jsonl, one {"image": "a.png", "caption": "..."} a line
            (image paths relative to the folder, read with Pillow)

A training sequence interleaves as many images with their captions as fit (up to max_images),
    <|endoftext|> <|image|> caption <|endoftext|> <|image|> caption <|endoftext|> <|pad|> ...
and the loss is taken on the captions and their closing <|endoftext|> only.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tokenizers import Tokenizer

from ..config import DataConfig, VisionConfig
from ..files import read_jsonl
from ..tokenizer import EOT, IMAGE, PAD
from .batches import Batch

SYNTHETIC_TASKS = ("digits", "shapes", "scenes", "mixed")
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240),
           "yellow": (240, 220, 40), "purple": (170, 60, 220), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
TRAIN, VAL, HELD_OUT = 0, 1, 2  # streams of the synthetic generator


# ---- the synthetic sets ---------------------------------------------------------------------

@functools.cache
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's own font: no file to find


def render_digits(rng: np.random.Generator, side: int) -> tuple[Image.Image, str]:
    text = str(int(rng.integers(0, 1000)))
    font = _font(int(rng.integers(side * 3 // 8, side // 2 + 1)))
    left, top, right, bottom = font.getbbox(text)
    background = tuple(int(c) for c in rng.integers(0, 80, 3))
    image = Image.new("RGB", (side, side), background)
    x = int(rng.integers(0, max(side - (right - left), 0) + 1)) - left
    y = int(rng.integers(0, max(side - (bottom - top), 0) + 1)) - top
    ImageDraw.Draw(image).text((x, y), text, fill=tuple(int(c) for c in rng.integers(150, 256, 3)), font=font)
    return image, text


def render_shape(rng: np.random.Generator, side: int, say_where: bool = False) -> tuple[Image.Image, str]:
    colour, shape, quadrant = (rng.choice(len(x)) for x in (COLOURS, SHAPES, QUADRANTS))
    name = list(COLOURS)[colour]
    fill = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLOURS[name])
    image = Image.new("RGB", (side, side), tuple(int(c) for c in rng.integers(0, 60, 3)))
    if say_where:  # inside its quadrant
        half = side // 2
        r = int(rng.integers(side // 8, side // 4))  # half the shape's width
        cx = int(rng.integers(r, half - r + 1)) + half * (quadrant % 2)
        cy = int(rng.integers(r, half - r + 1)) + half * (quadrant // 2)
    else:  # large, anywhere
        r = int(rng.integers(side // 5, side // 3 + 1))
        cx, cy = (int(rng.integers(r, side - r + 1)) for _ in range(2))
    draw = ImageDraw.Draw(image)
    box = (cx - r, cy - r, cx + r - 1, cy + r - 1)
    if SHAPES[shape] == "circle":
        draw.ellipse(box, fill=fill)
    elif SHAPES[shape] == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r - 1, cy + r - 1), (cx - r, cy + r - 1)], fill=fill)
    return image, f"{name} {SHAPES[shape]} {QUADRANTS[quadrant]}" if say_where else f"{name} {SHAPES[shape]}"


def synthetic_example(task: str, rng: np.random.Generator, side: int) -> tuple[Image.Image, str]:
    if task == "mixed":
        task = "digits" if rng.random() < 0.5 else "shapes"
    return render_digits(rng, side) if task == "digits" else render_shape(rng, side, say_where=task == "scenes")


def to_tensor(image: Image.Image, cfg: VisionConfig) -> torch.Tensor:
    """(C, W, W) in [0, 1]: the image in the config's channels and size."""
    image = image.convert("RGB" if cfg.channels == 3 else "L")
    if image.size != (cfg.image_size, cfg.image_size):
        image = image.resize((cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32).reshape(cfg.image_size, cfg.image_size, cfg.channels) / 255
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_image(path: str | Path, cfg: VisionConfig) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            return to_tensor(image, cfg)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image") from None
    except OSError as e:  # Pillow cannot read it
        raise ValueError(f"{path}: not a readable image ({e})") from None


# ---- a folder of real pairs -----------------------------------------------------------------

def read_caption_folder(folder: str | Path) -> list[tuple[Path, str]]:
    """(image path, caption) pairs listed in folder/captions.jsonl, every image checked to exist."""
    folder = Path(folder).expanduser()
    index = folder / "captions.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"data.images {folder}: no captions.jsonl there "
                                f"(or use a synthetic set: {', '.join(SYNTHETIC_TASKS)})")
    pairs = []
    for number, record in read_jsonl(index, ("image", "caption")):
        image, caption = folder / str(record["image"]), str(record["caption"])
        if not image.is_file():
            raise FileNotFoundError(f"{index}:{number}: image {image} does not exist")
        pairs.append((image, caption))
    if len(pairs) < 2:
        raise ValueError(f"{index}: needs at least 2 pairs (one is held out), found {len(pairs)}")
    return pairs


# ---- batches --------------------------------------------------------------------------------

class CaptionData:
    """Interleaved image-caption sequences, drawn statelessly like the text data."""

    def __init__(self, cfg: DataConfig, vision: VisionConfig, tokenizer: Tokenizer, seed: int = 0):
        self.vision, self.tokenizer, self.seed = vision, tokenizer, seed
        self.task = cfg.images
        self.eot, self.image_id, self.pad = (tokenizer.token_to_id(t) for t in (EOT, IMAGE, PAD))
        if self.task in SYNTHETIC_TASKS:
            if vision.channels != 3:
                raise ValueError(f"data.images={self.task}: the synthetic sets are in colour, "
                                 f"model.vision.channels must be 3 (got {vision.channels})")
            self.pairs = self.val_pairs = None
        else:
            pairs = read_caption_folder(self.task)
            n_val = max(int(len(pairs) * cfg.val_fraction), 1)
            self.pairs, self.val_pairs = pairs[:-n_val], pairs[-n_val:]
        n_held_out = cfg.caption_eval_examples if self.pairs is None else len(self.val_pairs)
        # The fixed examples caption accuracy is measured on, never trained on.
        self.held_out = [self.example(i, HELD_OUT) for i in range(n_held_out)]
        self.bytes_per_token = (sum(len(c.encode()) for _, c in self.held_out)
                                / sum(len(self.caption_ids(c)) for _, c in self.held_out))

    def caption_ids(self, caption: str) -> list[int]:
        """The tokens the model is trained to produce after an <|image|>: the caption, then its end."""
        return [*self.tokenizer.encode(caption).ids, self.eot]

    def example(self, j: int, split: int) -> tuple[torch.Tensor, str]:
        """Example j of a stream: a fresh synthetic image, or a pair from the folder."""
        rng = np.random.default_rng([self.seed, j, split])
        if self.pairs is None:
            image, caption = synthetic_example(self.task, rng, self.vision.image_size)
            return to_tensor(image, self.vision), caption
        pairs = self.pairs if split == TRAIN else self.val_pairs
        path, caption = pairs[j % len(pairs)] if split == HELD_OUT else pairs[rng.integers(len(pairs))]
        return self._load(path), caption

    @functools.lru_cache(maxsize=4096)
    def _load(self, path: Path) -> torch.Tensor:
        return load_image(path, self.vision)

    def batch(self, first: int, n: int, seq_len: int, split: str = "train") -> Batch:
        """Sequences first .. first + n - 1, each packed with as many images and captions as fit
        (up to max_images; how many varies with the captions' lengths)."""
        stream = TRAIN if split == "train" else VAL
        M, rows, targets, images = self.vision.max_images, [], [], []
        for j in range(first, first + n):
            tokens, loss_on, pictures = [self.eot], [False], []
            for i in range(M):
                image, caption = self.example(j * M + i, stream)
                ids = [self.image_id, *self.caption_ids(caption)]
                if pictures and len(tokens) + len(ids) > seq_len + 1:
                    break  # the sequence is full
                tokens += ids
                loss_on += [False] + [True] * (len(ids) - 1)
                pictures.append(image)
            tokens, loss_on = tokens[: seq_len + 1], loss_on[: seq_len + 1]
            pad = seq_len + 1 - len(tokens)
            window = torch.tensor(tokens + [self.pad] * pad)
            rows.append(window[:-1])
            targets.append(torch.where(torch.tensor(loss_on[1:] + [False] * pad), window[1:], -100))
            images.append(torch.stack(pictures + [torch.zeros_like(pictures[0])] * (M - len(pictures))))
        return Batch(torch.stack(rows), torch.stack(targets), torch.stack(images))
