"""Caption accuracy: exact-match greedy captioning of held-out images, measured in one forward."""

from __future__ import annotations

import torch

from ..data.captions import CaptionData


@torch.no_grad()
def caption_accuracy(model, examples: list[tuple[torch.Tensor, str]], data: CaptionData,
                     blank: bool = False, batch_size: int = 64) -> float:
    """Exact-match accuracy of greedy captioning: `<|endoftext|> <|image|>` in, caption + end out.

    Greedy decoding writes the caption exactly if and only if, fed the true caption, the argmax
    at every position is the next true token (by induction over the positions), so one batched
    forward decides it. `blank=True` shows the model black images instead: chance level.
    """
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        rows = [[data.eot, data.image_id, *data.caption_ids(caption)] for _, caption in chunk]
        width = max(map(len, rows))
        tokens = torch.tensor([r + [data.pad] * (width - len(r)) for r in rows], device=device)
        images = torch.stack([image for image, _ in chunk])[:, None].to(device)  # (B, 1, C, W, W)
        if blank:
            images = torch.zeros_like(images)
        predicted = model(tokens, images=images).logits.argmax(dim=-1)
        for b, row in enumerate(rows):
            correct += bool((predicted[b, 1:len(row) - 1] == tokens[b, 2:len(row)]).all())
    return correct / len(examples)
