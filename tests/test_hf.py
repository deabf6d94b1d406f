"""Export to and import from the Hugging Face Mixtral format: logit parity with transformers'
own MixtralForCausalLM, identical greedy generation, exact round trips, clear refusals."""

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe import MoETransformer, load_config
from moe import checkpoint as ckpt
from moe.config import Config
from moe.files import current_umask
from moe.hf import export, import_
from moe.infer.prompts import prompt_with_images
from moe.infer.sampling import SamplingParams, generate
from moe.tokenizer import train_tokenizer
from moe.train.trainer import RunOptions, Trainer

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent
TEXT = ["def main():\n    return 42\n", "Mixture of experts routes each token to two of sixteen experts.\n"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    source = [Path(m.__file__).read_text() for m in (json, subprocess)]
    tokenizer = train_tokenizer(source, 512)
    assert tokenizer.get_vocab_size() == 512  # the tiny config's vocabulary, as training requires
    return tokenizer


def saved_run(tmp_path, tokenizer, *overrides, scale=1.0):
    """A run directory holding a random tiny model whose weights are large enough that routing and
    attention matter (not the near-uniform logits of a fresh init)."""
    cfg = load_config("tiny", list(overrides)).model
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 0:  # a vision gate: left shut
                continue
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else scale * torch.randn_like(p)
                    / p.shape[-1] ** 0.5)
    run = tmp_path / "run"
    ckpt.save_checkpoint(run, 0, model, {}, Config(model=cfg), tokenizer, keep=1)
    return run, model


def hf_model(folder):
    return transformers.MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("overrides", [
    ("model.n_kv_heads=1",), ("model.n_kv_heads=2",), ("model.n_kv_heads=1", "model.tie_embeddings=true"),
    ("model.n_kv_heads=2", "model.tie_embeddings=true", "model.rope_theta=500", "model.rope_scale=2"),
    ("model.n_experts=1", "model.top_k=1"),  # dense: one expert the router always picks
], ids=["mqa", "gqa", "mqa-tied", "gqa-tied-rope", "dense"])
def test_exported_logits_and_greedy_tokens_match_transformers(tmp_path, tokenizer, overrides):
    run, ours = saved_run(tmp_path, tokenizer, *overrides)
    theirs = hf_model(export(run, tmp_path / "hf"))
    tokens = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits, their_logits = ours.eval()(tokens).logits, theirs(tokens).logits
    assert ours_logits.std() > 0.5  # logits with something to match
    assert (ours_logits - their_logits).abs().max() < 1e-4
    prompt = tokens[0, :5].tolist()
    mine = list(generate(ours, prompt, SamplingParams(max_new_tokens=20, temperature=0)))
    theirs.generation_config.eos_token_id = None  # 20 tokens whatever they are, as ours (no stop tokens)
    out = theirs.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
    assert out[0, 5:].tolist() == mine


def test_import_of_export_is_bit_identical_and_the_tokenizer_loads(tmp_path, tokenizer):
    run, ours = saved_run(tmp_path, tokenizer, "model.n_kv_heads=2")
    hf = export(run, tmp_path / "hf")
    back = import_(hf, tmp_path / "back")
    model, back_tokenizer = ckpt.load_for_inference(back)
    assert model.cfg == ours.cfg
    assert ours.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ours.state_dict().items())
    assert back_tokenizer.to_str() == tokenizer.to_str()
    auto = transformers.AutoTokenizer.from_pretrained(hf)
    assert auto.encode(TEXT[1]) == [0, *tokenizer.encode(TEXT[1]).ids]  # <|endoftext|> first, as generate.py does
    assert auto.decode(auto.encode(TEXT[0]), skip_special_tokens=True) == TEXT[0]
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    assert {p.stat().st_mode & 0o777 for p in hf.iterdir()} == {0o666 & ~current_umask()}  # the weights too


def test_transformers_tokenizer_and_generate_answer_as_generate_py_does(tmp_path, entry_point):
    cfg = load_config("tiny", [f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}", "data.sources={docs = 1}",
                               "train.max_steps=30", "train.sample_tokens=0"])
    Trainer(cfg, RunOptions(tmp_path / "run", torch.device("cpu"), peak_flops=1e11, quiet=True)).train()
    hf = export(tmp_path / "run", tmp_path / "hf")
    prompt = "def main():"
    ours = entry_point("generate.py", "--checkpoint", tmp_path / "run", "--prompt", prompt, "--temperature", "0",
                       "--max-new-tokens", "24")
    assert ours.returncode == 0, ours.stderr
    auto = transformers.AutoTokenizer.from_pretrained(hf)
    ids = auto(prompt, return_tensors="pt").input_ids
    _, ours_tokenizer = ckpt.load_for_inference(tmp_path / "run")
    assert ids[0].tolist() == prompt_with_images(ours_tokenizer, prompt, [], None)[0]  # what generate.py feeds
    out = hf_model(hf).generate(ids, max_new_tokens=24, do_sample=False)
    assert ours.stdout == prompt + auto.decode(out[0, ids.shape[1]:], skip_special_tokens=True) + "\n"


def test_an_imported_run_is_not_resumable_but_can_start_one(tmp_path, tokenizer, entry_point):
    run, _ = saved_run(tmp_path, tokenizer)
    back = import_(export(run, tmp_path / "hf"), tmp_path / "back")
    proc = entry_point("train.py", "--out", tmp_path / "back", "--resume")
    assert proc.returncode == 2 and "holds weights only" in proc.stderr and "--init-from" in proc.stderr
    assert back.is_dir()


def test_missing_and_mismatched_tensors_are_clear_errors(tmp_path, tokenizer):
    run, _ = saved_run(tmp_path, tokenizer)
    hf = export(run, tmp_path / "hf")
    tensors = load_file(str(hf / "model.safetensors"))
    broken = dict(tensors)
    del broken["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(broken, str(hf / "model.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match="missing tensor model.layers.1.block_sparse_moe.experts.3.w2.weight"):
        import_(hf, tmp_path / "a")
    broken = {**tensors, "model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 64)}
    save_file(broken, str(hf / "model.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match=r"blocks.0.attn.wk.weight has shape \(32, 64\), expected \(16, 64\)"):
        import_(hf, tmp_path / "b")
    save_file({**tensors, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, str(hf / "model.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match="unexpected tensor model.layers.0.self_attn.q_norm.weight"):
        import_(hf, tmp_path / "c")
    assert not ckpt.list_checkpoints(tmp_path / "a")  # nothing half-written


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type 'llama', only 'mixtral' is supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"sliding_window": 16}, "sliding_window 16"),
    ({"head_dim": 8}, "head_dim 8"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope type 'yarn'"),
    ({"num_experts_per_tok": 1}, "num_experts_per_tok 1 of 16 experts"),
])
def test_import_refuses_what_it_cannot_represent(tmp_path, tokenizer, change, message):
    run, _ = saved_run(tmp_path, tokenizer)
    hf = export(run, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(Exception, match=message) as info:
        import_(hf, tmp_path / "back")
    assert "moe cannot represent this model" in str(info.value)


@pytest.mark.parametrize("override, message", [
    ("model.moe_every=2", "model.moe_every=2: Mixtral has an MoE block in every layer"),
    ("model.top_k=1", "model.top_k=1 of 16 experts: our gate is the chosen expert's probability"),
])
def test_export_refuses_what_mixtral_cannot_express(tmp_path, tokenizer, override, message):
    run, _ = saved_run(tmp_path, tokenizer, override)
    with pytest.raises(Exception, match=message):
        export(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_vision_model_exports_its_text_part(tmp_path, tokenizer):
    run, ours = saved_run(tmp_path, tokenizer, "model.vision={image_size = 8, patch_size = 4, d_vision = 16, "
                          "vit_layers = 1, vit_heads = 2, n_latents = 2, resampler_layers = 1}")
    notes = []
    theirs = hf_model(export(run, tmp_path / "hf", warn=notes.append))
    assert "only the text model is exported" in notes[0]
    tokens = torch.randint(5, 512, (2, 16))
    with torch.no_grad():
        assert (ours.eval()(tokens).logits - theirs(tokens).logits).abs().max() < 1e-4


def test_cli_round_trip_and_one_line_errors(tmp_path, tokenizer, entry_point, monkeypatch):
    hf_cli = partial(entry_point, "-m", "moe.hf")
    run, _ = saved_run(tmp_path, tokenizer)
    proc = hf_cli("export", "--checkpoint", str(run), "--out", str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr
    proc = hf_cli("import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back"))
    assert proc.returncode == 0, proc.stderr
    for args, message in [
        (("export", "--checkpoint", str(run), "--out", str(tmp_path / "hf")), "exists and is not empty"),
        (("import", "--hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")), "no config.json there"),
        (("import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")), "already holds checkpoints"),
    ]:
        proc = hf_cli(*args)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the hf extra were not installed
    proc = hf_cli("export", "--checkpoint", str(run), "--out", str(tmp_path / "hf2"))
    assert proc.returncode == 2 and "pip install -e '.[hf]'" in proc.stderr


def test_import_reads_the_tensors_transformers_holds_in_memory(tmp_path, tokenizer):
    """transformers 5 fuses each layer's experts (gate_up_proj, down_proj); a folder saved from
    those names imports to the same model."""
    run, ours = saved_run(tmp_path, tokenizer, "model.n_kv_heads=2")
    hf = export(run, tmp_path / "hf")
    state = {k: v.contiguous() for k, v in hf_model(hf).state_dict().items()}
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / "mem").mkdir(exist_ok=True)
        (tmp_path / "mem" / name).write_text((hf / name).read_text())
    save_file(state, str(tmp_path / "mem" / "model.safetensors"))
    model, _ = ckpt.load_for_inference(import_(tmp_path / "mem", tmp_path / "back"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ours.state_dict().items())
