"""The vision branch: identity at zero gates, each token sees only its most recent image, caching,
the synthetic caption data, training with a frozen text model, generation with images."""

import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moe import MoETransformer
from moe import checkpoint as ckpt
from moe.config import VisionConfig, load_config
from moe.data.captions import CaptionData, render_digits, render_shape
from moe.infer.engine import Engine, Request
from moe.infer.sampling import SamplingParams, generate, generate_uncached
from moe.model.kv_cache import KVCache
from moe.model.vision import media_index
from moe.tokenizer import IMAGE_ID, train_tokenizer
from moe.train.evaluate import caption_accuracy
from moe.train.trainer import RunOptions, Trainer

ROOT = Path(__file__).resolve().parent.parent
SMALL_VISION = VisionConfig(image_size=16, patch_size=4, d_vision=32, vit_layers=1, vit_heads=2,
                            n_latents=4, resampler_layers=1, max_images=3)


@pytest.fixture
def vision_cfg(tiny):
    return replace(tiny, vision=SMALL_VISION)


def open_gates(model, value=0.7):
    """A trained branch's gates are not 0: set them so the images matter."""
    for block in model.vision.xattn.values():
        block.attn_gate.data.fill_(value)
        block.ffn_gate.data.fill_(value)
    return model


def interleaved(cfg, T=20, at=(4, 11)):
    """One row of text with <|image|> tokens at positions `at`."""
    tokens = torch.randint(5, cfg.vocab_size, (1, T))
    tokens[0, list(at)] = IMAGE_ID
    return tokens


def test_media_index_points_each_token_at_its_most_recent_image():
    tokens = torch.tensor([[7, IMAGE_ID, 8, 9, IMAGE_ID, 10], [IMAGE_ID, 5, 5, 5, 5, 5]])
    assert media_index(tokens).tolist() == [[-1, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]]
    assert media_index(tokens[:, 2:], torch.tensor([1, 1])).tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]


def test_zero_gates_give_exactly_the_text_only_model(tiny, vision_cfg):
    text = MoETransformer(tiny).eval()
    vision = MoETransformer(vision_cfg).eval()
    missing, unexpected = vision.load_state_dict(text.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("vision.") for k in missing)
    tokens = interleaved(tiny)
    images = torch.rand(1, 2, 3, 16, 16)
    assert torch.equal(vision(tokens, images=images).logits, text(tokens).logits)


def test_each_token_sees_only_its_most_recent_image(vision_cfg):
    """What the first cross-attention block adds: tokens from image 2 on are blind to image 1.

    (Logits after image 2 still depend on image 1, as in Flamingo: self-attention reads the text
    between the images, which saw image 1. What each token *sees of the images* is image 2 only.)
    """
    model = open_gates(MoETransformer(vision_cfg).eval())
    tokens = interleaved(vision_cfg, at=(4, 11))
    seen = []
    model.vision.xattn["0"].attn.register_forward_hook(lambda module, args, out: seen.append(out))
    images = torch.rand(1, 2, 3, 16, 16)
    other_first = images.clone()
    other_first[:, 0] = torch.rand(3, 16, 16)
    model(tokens, images=images)
    model(tokens, images=other_first)
    before, after = seen
    assert torch.equal(before[:, 11:], after[:, 11:])  # image 2 and everything after it
    assert (before[:, 4:11] - after[:, 4:11]).abs().amax(-1).min() > 1e-4  # image 1 .. image 2: changed


def test_tokens_before_the_first_image_are_unaffected_by_images(vision_cfg):
    model = open_gates(MoETransformer(vision_cfg).eval())
    tokens = interleaved(vision_cfg, at=(6, 12))
    a = model(tokens, images=torch.rand(1, 2, 3, 16, 16)).logits
    b = model(tokens, images=torch.rand(1, 2, 3, 16, 16)).logits
    text_only = model(tokens).logits
    torch.testing.assert_close(a[:, :6], text_only[:, :6])
    torch.testing.assert_close(b[:, :6], text_only[:, :6])
    assert (a[:, 6:] - b[:, 6:]).abs().amax(-1).min() > 1e-4  # from the first image on, they differ


def test_gradients_reach_the_encoder_and_the_gates(vision_cfg):
    model = MoETransformer(vision_cfg)
    tokens = interleaved(vision_cfg)
    model(tokens, tokens, images=torch.rand(1, 2, 3, 16, 16)).loss.backward()
    gates = [p.grad for name, p in model.named_parameters() if name.endswith("_gate")]
    assert all(g is not None and g.abs() > 0 for g in gates)  # at 0, the gates still learn
    model.zero_grad()
    open_gates(model)(tokens, tokens, images=torch.rand(1, 2, 3, 16, 16)).loss.backward()
    for p in (model.vision.encoder.patch.weight, model.vision.encoder.pos_PDv, model.vision.resampler.latents_LDv):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_a_batch_with_different_image_counts_runs(vision_cfg):
    model = open_gates(MoETransformer(vision_cfg).eval())
    tokens = torch.randint(5, vision_cfg.vocab_size, (3, 16))
    tokens[1, 3] = IMAGE_ID
    tokens[2, [1, 6, 9]] = IMAGE_ID  # rows hold 0, 1 and 3 images
    images = torch.rand(3, 3, 3, 16, 16)
    logits = model(tokens, images=images).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[0], model(tokens[:1]).logits[0])  # no image: the text model
    torch.testing.assert_close(logits[1], model(tokens[1:2], images=images[1:2, :1]).logits[0])  # padding unseen


def test_cached_decode_with_images_equals_the_full_forward(vision_cfg):
    model = open_gates(MoETransformer(vision_cfg).eval())
    tokens = torch.randint(5, vision_cfg.vocab_size, (2, 20))
    tokens[0, [1, 12]] = IMAGE_ID  # the second image arrives during decoding
    tokens[1, 2] = IMAGE_ID
    images = torch.rand(2, 2, 3, 16, 16)
    with torch.no_grad():
        full = model(tokens, images=images).logits
        cache = KVCache(model.cfg, slots=2)
        prefill = model(tokens[:, :8], cache=cache, images=images)
        torch.testing.assert_close(prefill.logits, full[:, :8])
        for t in range(8, 20):
            new_images = images[:, 1:] if t == 12 else None  # the image goes with its token
            step = model(tokens[:, t:t + 1], cache=cache, images=new_images)
            torch.testing.assert_close(step.logits[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
    assert cache.images_seen.tolist() == [2, 1]


def test_generation_with_an_image_encodes_it_once_and_matches_uncached(vision_cfg):
    model = open_gates(MoETransformer(vision_cfg).eval())
    image = torch.rand(1, 3, 16, 16)
    prompt = [0, IMAGE_ID, 7, 8]
    params = SamplingParams(12, temperature=0)
    calls = []
    model.vision.encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    cached = list(generate(model, prompt, params, images=image))
    assert calls == [1]  # one image, encoded once, at the prefill
    assert cached == generate_uncached(model, prompt, params, images=image)
    engine = Engine(model, slots=2)
    results = engine.run([Request(prompt, params, id=0, images=image), Request([0, 5, 6], params, id=1),
                          Request(prompt, params, id=2, images=image)])
    assert {r.id: r.tokens for r in results}[2] == cached  # the refilled slot forgot its old image
    later = [0, 7, 8, 9, 5, IMAGE_ID, 7, 8]  # prefilled 3 tokens a step: the image arrives with the second chunk
    chunked = Engine(model, slots=1, step_tokens=3).run([Request(later, params, images=image)])
    assert chunked[0].tokens == list(generate(model, later, params, images=image))


def test_image_errors_are_clear(tiny, vision_cfg):
    with pytest.raises(ValueError, match="no vision branch"):
        MoETransformer(tiny)(interleaved(tiny), images=torch.rand(1, 2, 3, 16, 16))
    model = MoETransformer(vision_cfg)
    with pytest.raises(ValueError, match="row 0 has 2 <\\|image\\|> tokens but only 1 images"):
        model(interleaved(vision_cfg), images=torch.rand(1, 1, 3, 16, 16))
    with pytest.raises(ValueError, match="images of shape \\(3, 32, 32\\), expected"):
        model(interleaved(vision_cfg), images=torch.rand(1, 2, 3, 32, 32))


def test_caption_accuracy_is_exact_match_of_greedy_captions(vision_cfg):
    """With an output head of zeros every argmax is token 0 (<|endoftext|>): greedy captioning
    writes the empty caption, so exactly the empty captions count as right."""
    tokenizer = train_tokenizer(["red circle top left 123 blue square"] * 20, vision_cfg.vocab_size)
    data = CaptionData.__new__(CaptionData)
    data.tokenizer, data.eot, data.image_id, data.pad = tokenizer, 0, IMAGE_ID, 1
    model = MoETransformer(vision_cfg).eval()
    model.lm_head.weight.data.zero_()
    image = torch.rand(3, 16, 16)
    assert list(generate(model, [0, IMAGE_ID], SamplingParams(5, temperature=0, stop_tokens=(0,)), images=image[None])) == [0]
    examples = [(image, ""), (image, "red circle"), (image, ""), (image, "123")]
    assert caption_accuracy(model, examples, data) == 0.5
    assert caption_accuracy(model, examples, data, blank=True) == 0.5


def test_synthetic_images_are_seeded_and_captioned():
    image, caption = render_shape(np.random.default_rng(3), 32, say_where=True)
    again, same = render_shape(np.random.default_rng(3), 32, say_where=True)
    assert caption == same and np.array_equal(np.asarray(image), np.asarray(again))
    colour, shape, *where = caption.split()
    assert shape in ("circle", "square", "triangle") and " ".join(where) in ("top left", "top right", "bottom left", "bottom right")
    assert render_shape(np.random.default_rng(3), 32)[1] == f"{colour} {shape}"  # the `shapes` task: no place
    _, number = render_digits(np.random.default_rng(4), 32)
    assert number.isdigit() and 0 <= int(number) < 1000


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def vision_config(cache_dir, *overrides):
    return load_config("tiny", [f"data.cache_dir={json.dumps(cache_dir)}", "data.sources={docs = 1}",
                                "data.images=mixed", "data.caption_eval_examples=16", "train.sample_tokens=0",
                                "model.max_seq_len=32", "train.batch_size=4", "train.batch_size_start=4",
                                "train.micro_batch_size=4", "train.eval_batches=1",
                                *[f"model.vision.{k}={v}" for k, v in vars(SMALL_VISION).items()], *overrides])


def test_caption_batches_interleave_images_with_their_captions(cache_dir):
    cfg = vision_config(cache_dir)
    trainer = Trainer(cfg, RunOptions(Path(cache_dir) / "unused", torch.device("cpu"), peak_flops=1e11, quiet=True))
    data = trainer.data
    batch = data.batch(0, 8, 32)
    assert batch.images.shape == (8, 3, 3, 16, 16)
    counts = (batch.inputs == IMAGE_ID).sum(1)
    assert counts.min() >= 1 and counts.max() <= 3
    row = batch.inputs[0].tolist()
    first, second = row.index(IMAGE_ID), row.index(IMAGE_ID, row.index(IMAGE_ID) + 1) if counts[0] > 1 else None
    _, caption = data.example(0, 0)
    assert row[first + 1:first + 1 + len(data.caption_ids(caption))] == data.caption_ids(caption)
    assert (batch.targets[0, first] == data.caption_ids(caption)[0]) and batch.targets[0, 0] == -100
    if second is not None:
        assert batch.targets[0, second - 1] == -100  # the <|image|> token itself is never a target
    assert torch.equal(data.batch(0, 8, 32).images, batch.images)  # seeded


def test_vision_training_from_a_text_checkpoint_with_the_text_model_frozen(cache_dir, tmp_path):
    text = load_config("tiny", [f"data.cache_dir={json.dumps(cache_dir)}", "data.sources={docs = 1}",
                                "train.max_steps=2", "train.sample_tokens=0"])
    Trainer(text, RunOptions(tmp_path / "text", torch.device("cpu"), peak_flops=1e11, quiet=True)).train()
    source = ckpt.resolve_checkpoint(tmp_path / "text")
    cfg = vision_config(cache_dir, "train.max_steps=3", "train.freeze_lm=true", "train.encoder_hold_steps=1")
    trainer = Trainer(cfg, RunOptions(tmp_path / "vision", torch.device("cpu"), init_from=source, peak_flops=1e11,
                                      quiet=True))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.train()
    assert 0 <= summary["caption_acc"] <= 1 and 0 <= summary["caption_acc_blank"] <= 1
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("vision.") for k in changed)
    assert "vision.encoder.patch.weight" in changed and "vision.xattn.0.attn_gate" in changed
    text_model = MoETransformer(text.model)
    ckpt.load_weights(source, text_model)
    assert torch.equal(after["lm_head.weight"], text_model.lm_head.weight)
    with pytest.raises(Exception, match="freeze_lm=true: the model has no vision branch"):
        Trainer(load_config("tiny", [f"data.cache_dir={json.dumps(cache_dir)}", "data.sources={docs = 1}",
                                     "train.freeze_lm=true"]),
                RunOptions(tmp_path / "x", torch.device("cpu"), peak_flops=1e11, quiet=True))


def test_the_encoder_is_held_at_its_initial_weights_for_encoder_hold_steps(cache_dir, tmp_path):
    cfg = vision_config(cache_dir, "train.max_steps=3", "train.encoder_hold_steps=2")
    trainer = Trainer(cfg, RunOptions(tmp_path / "run", torch.device("cpu"), peak_flops=1e11, quiet=True))
    model = trainer.model
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def changed() -> set[str]:
        return {k.split(".")[1] for k, v in model.state_dict().items() if k.startswith("vision.")
                and not torch.equal(v, initial[k])}

    trainer.train_step()
    trainer.train_step()
    assert changed() == {"xattn"}  # the cross-attention learns; the encoder and resampler are as they were
    assert model.vision.encoder.patch.weight.grad is None  # and the backward pass skipped them
    trainer.train_step()
    assert changed() == {"xattn", "encoder", "resampler"}


def test_caption_pairs_are_read_from_a_folder(cache_dir, tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        image, caption = render_shape(rng, 24)  # any size: resized to the config's
        image.save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": caption}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    cfg = vision_config(cache_dir, f"data.images={json.dumps(str(tmp_path))}", "data.val_fraction=0.25")
    trainer = Trainer(cfg, RunOptions(tmp_path / "run", torch.device("cpu"), peak_flops=1e11, quiet=True))
    assert len(trainer.data.held_out) == 1 and trainer.data.held_out[0][1] == json.loads(lines[-1])["caption"]
    assert trainer.data.batch(0, 2, 32).images.shape == (2, 3, 3, 16, 16)
    (tmp_path / "captions.jsonl").write_text(lines[0] + "\n{\"image\": \"missing.png\", \"caption\": \"x\"}\n")
    with pytest.raises(FileNotFoundError, match="captions.jsonl:2: image .*missing.png does not exist"):
        Trainer(cfg, RunOptions(tmp_path / "run2", torch.device("cpu"), peak_flops=1e11, quiet=True))


@pytest.fixture(scope="module")
def vision_run(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vision") / "run"
    Trainer(vision_config(cache_dir, "train.max_steps=2"), RunOptions(out, torch.device("cpu"), peak_flops=1e11,
                                                                      quiet=True)).train()
    return out


@pytest.fixture
def generate_cli(entry_point):
    return partial(entry_point, "generate.py")


def test_generate_captions_an_image(vision_run, tmp_path, generate_cli):
    image, _ = render_digits(np.random.default_rng(0), 40)
    image.save(tmp_path / "number.png")
    proc = generate_cli("--checkpoint", str(vision_run), "--image", str(tmp_path / "number.png"),
                        "--max-new-tokens", "4", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert "1 request" in proc.stderr
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "", "images": ["number.png"]}) + "\n"
                       + json.dumps({"prompt": "a text-only prompt"}) + "\n")
    proc = generate_cli("--checkpoint", str(vision_run), "--prompt-file", str(prompts), "--max-new-tokens", "3")
    assert proc.returncode == 0, proc.stderr
    assert "2 requests" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--image", "nowhere.png"], "nowhere.png: no such image"),
    (["--image", "README.md"], "README.md: not a readable image"),
])
def test_generate_image_errors_are_one_clear_line(vision_run, args, message, generate_cli):
    proc = generate_cli("--checkpoint", str(vision_run), *[str(ROOT / a) if a == "README.md" else a for a in args])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip()[7:]}"]
    assert message in proc.stderr


def test_images_need_a_vision_model_in_generate(tmp_path, cache_dir, generate_cli):
    text = load_config("tiny", [f"data.cache_dir={json.dumps(cache_dir)}", "data.sources={docs = 1}",
                                "train.max_steps=1", "train.sample_tokens=0"])
    Trainer(text, RunOptions(tmp_path / "text", torch.device("cpu"), peak_flops=1e11, quiet=True)).train()
    Image.new("RGB", (16, 16)).save(tmp_path / "black.png")
    proc = generate_cli("--checkpoint", str(tmp_path / "text"), "--image", str(tmp_path / "black.png"))
    assert proc.returncode == 2 and "no vision branch" in proc.stderr
