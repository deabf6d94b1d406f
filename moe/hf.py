"""Export to and import from the Hugging Face Mixtral format.

    python -m moe.hf export --checkpoint runs/small --out hf/small
    python -m moe.hf import --hf hf/small --out runs/small-back

Our model is Mixtral's architecture (pre-norm RMSNorm, rotary embeddings in `rotate_half` layout,
SwiGLU experts, a linear router with softmax, top-k and the k gates renormalised), so the
mapping is a renaming plus a transpose of the stacked expert weights:

    ours                              Mixtral on disk (what transformers writes and reads)
    tok_emb.weight                    model.embed_tokens.weight
    blocks.i.attn_norm.weight         model.layers.i.input_layernorm.weight
    blocks.i.attn.w{q,k,v,o}.weight   model.layers.i.self_attn.{q,k,v,o}_proj.weight
    blocks.i.ffn_norm.weight          model.layers.i.post_attention_layernorm.weight
    blocks.i.ffn.router.weight        model.layers.i.block_sparse_moe.gate.weight
    blocks.i.ffn.experts.w1[e]  (D,F) model.layers.i.block_sparse_moe.experts.e.w1.weight (F,D)
    blocks.i.ffn.experts.w3[e]  (D,F) ...experts.e.w3.weight (F,D)
    blocks.i.ffn.experts.w2[e]  (F,D) ...experts.e.w2.weight (D,F)
    norm.weight, lm_head.weight       model.norm.weight, lm_head.weight (absent when tied)

A dense model (n_experts = 1) is a Mixtral with one expert that the router always picks (the
softmax of one logit is exactly 1). Top-1 of several experts is not exported: our single gate is
the expert's probability (Switch's), Mixtral's is renormalised to 1. Imports also accept
transformers 5's fused expert tensors (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`).
Weights only; nothing is downloaded.
The `hf` extra (pip install -e '.[hf]') provides transformers, used for the config and tokenizer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, processors
from torch import Tensor

from . import checkpoint as ckpt
from .cli import run
from .config import Config, ConfigError, ModelConfig
from .files import atomic_folder
from .model import MoETransformer
from .model.params import is_vision, param_kind
from .tokenizer import EOT, PAD, load_tokenizer

INSTALL = "the Hugging Face commands need transformers: pip install -e '.[hf]'"


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise ConfigError(INSTALL) from None
    return transformers


# ---- configs --------------------------------------------------------------------------------

def to_hf_config(cfg: ModelConfig, eot: int, pad: int):
    """A `MixtralConfig` for our model; refuses what Mixtral cannot express."""
    if cfg.n_experts > 1 and cfg.moe_every != 1:
        raise ConfigError(f"model.moe_every={cfg.moe_every}: Mixtral has an MoE block in every layer, "
                          f"so a model with dense layers between MoE layers cannot be exported")
    if cfg.n_experts > 1 and cfg.top_k == 1:
        raise ConfigError(f"model.top_k=1 of {cfg.n_experts} experts: our gate is the chosen expert's probability "
                          f"(Switch), Mixtral's is renormalised to 1, so this model cannot be exported")
    transformers = transformers_module()
    hf = transformers.MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
        tie_word_embeddings=cfg.tie_embeddings, router_aux_loss_coef=cfg.aux_loss_coef,
        bos_token_id=eot, eos_token_id=eot, pad_token_id=pad, sliding_window=None,
        architectures=["MixtralForCausalLM"])  # what tools that pick the model class read (llama.cpp, vLLM)
    scaling = {"rope_type": "linear", "factor": cfg.rope_scale} if cfg.rope_scale != 1 else {"rope_type": "default"}
    if hasattr(hf, "rope_parameters"):  # transformers 5
        hf.rope_parameters = {**scaling, "rope_theta": cfg.rope_theta}
        hf.dtype = "float32"
    else:  # transformers 4
        hf.rope_theta = cfg.rope_theta
        hf.rope_scaling = None if cfg.rope_scale == 1 else {"type": "linear", "factor": cfg.rope_scale}
        hf.torch_dtype = "float32"
    return hf


def from_hf_config(hf: dict, where: Path) -> ModelConfig:
    """Our ModelConfig for a Mixtral config.json (as a dict); refuses what we cannot represent."""
    def refuse(why: str):
        return ConfigError(f"{where}: {why}; moe cannot represent this model")

    if hf.get("model_type") != "mixtral":
        raise refuse(f"model_type {hf.get('model_type')!r}, only 'mixtral' is supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise refuse(f"hidden_act {hf['hidden_act']!r} (our experts are SwiGLU: silu)")
    if hf.get("sliding_window") not in (None, 0) and hf["sliding_window"] < hf["max_position_embeddings"]:
        raise refuse(f"sliding_window {hf['sliding_window']} (our attention is full causal)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise refuse("biases in attention or MLP (ours have none)")
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, D // H) or D % H:
        raise refuse(f"head_dim {hf.get('head_dim')} with hidden_size {D} and {H} heads (ours is hidden_size / heads)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear"):
        raise refuse(f"rope type {kind!r} (ours: default, or linear position interpolation)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    E, k = hf["num_local_experts"], hf["num_experts_per_tok"]
    if E > 1 and k == 1:
        raise refuse(f"num_experts_per_tok 1 of {E} experts (Mixtral's single gate is always 1; ours is the "
                     f"expert's probability, as Switch's)")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=D, n_layers=hf["num_hidden_layers"], n_heads=H,
        n_kv_heads=hf.get("num_key_value_heads") or H, max_seq_len=hf["max_position_embeddings"],
        n_experts=E, top_k=1 if E == 1 else k, d_ff=hf["intermediate_size"], rope_theta=float(theta),
        rope_scale=float(rope.get("factor", 1.0)) if kind == "linear" else 1.0, norm_eps=hf["rms_norm_eps"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        aux_loss_coef=hf.get("router_aux_loss_coef", ModelConfig.aux_loss_coef))


# ---- weights --------------------------------------------------------------------------------

ATTENTION = (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj"))


def one_to_one(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(our name, Mixtral's) of every tensor that maps as it is: all but the FFNs'."""
    pairs = [("tok_emb.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    if not cfg.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    for i in range(cfg.n_layers):
        a, b = f"blocks.{i}.", f"model.layers.{i}."
        pairs += [(a + "attn_norm.weight", b + "input_layernorm.weight"),
                  (a + "ffn_norm.weight", b + "post_attention_layernorm.weight")]
        pairs += [(f"{a}attn.{mine}.weight", f"{b}self_attn.{theirs}.weight") for mine, theirs in ATTENTION]
    return pairs


def to_hf_weights(model) -> dict[str, Tensor]:
    """The model's text weights under Mixtral's on-disk names and layouts (every parameter but the
    vision branch's, which Mixtral cannot hold)."""
    cfg, ours = model.cfg, model.state_dict()
    left = {name for name in ours if not is_vision(name)}

    def take(name: str) -> Tensor:
        left.discard(name)
        return ours[name]

    out = {theirs: take(mine) for mine, theirs in one_to_one(cfg)}
    for i in range(cfg.n_layers):
        a, moe = f"blocks.{i}.", f"model.layers.{i}.block_sparse_moe."
        if cfg.is_moe_layer(i):
            out[moe + "gate.weight"] = take(a + "ffn.router.weight")
            for w in ("w1", "w2", "w3"):
                for e, weight in enumerate(take(f"{a}ffn.experts.{w}")):
                    out[f"{moe}experts.{e}.{w}.weight"] = weight.T
        else:  # dense: one expert, always chosen
            out[moe + "gate.weight"] = take(a + "ffn.w1.weight").new_zeros(1, cfg.d_model)
            for w in ("w1", "w2", "w3"):
                out[f"{moe}experts.0.{w}.weight"] = take(f"{a}ffn.{w}.weight")
    if cfg.tie_embeddings:
        left.discard("lm_head.weight")  # the embedding's own tensor, exported once
    if left:  # a parameter added to the model without a place in this mapping
        name = sorted(left)[0]
        raise ValueError(f"parameter {name} ({param_kind(name)}) has no Mixtral name in moe/hf.py")
    return {name: t.detach().contiguous().clone() for name, t in out.items()}


def from_hf_weights(cfg: ModelConfig, hf: dict[str, Tensor], where: Path) -> dict[str, Tensor]:
    """Our state dict from Mixtral tensors; every tensor must be there, used, and of the right shape."""
    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in hf:
            raise ckpt.CheckpointError(f"{where}: missing tensor {name}")
        used.add(name)
        return hf[name]

    ours = {mine: take(theirs) for mine, theirs in one_to_one(cfg)}
    for i in range(cfg.n_layers):
        a, b = f"blocks.{i}.", f"model.layers.{i}."
        experts = _experts(take, hf, b, cfg.n_experts)  # w1, w3: (E, F, D); w2: (E, D, F)
        if cfg.is_moe_layer(i):
            ours[a + "ffn.router.weight"] = take(b + ("mlp." if b + "mlp.gate.weight" in hf else "block_sparse_moe.")
                                                 + "gate.weight")
            for w in ("w1", "w2", "w3"):
                ours[f"{a}ffn.experts.{w}"] = experts[w].transpose(1, 2)
        else:
            used.update(n for n in (b + "block_sparse_moe.gate.weight", b + "mlp.gate.weight") if n in hf)
            for w in ("w1", "w2", "w3"):
                ours[f"{a}ffn.{w}.weight"] = experts[w][0]
    if cfg.tie_embeddings:
        used.add("lm_head.weight")  # some tied checkpoints still carry the head's copy
    unexpected = sorted(set(hf) - used)
    if unexpected:
        raise ckpt.CheckpointError(f"{where}: unexpected tensor {unexpected[0]}"
                                   + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    return {name: t.contiguous() for name, t in ours.items()}


def _experts(take, hf: dict[str, Tensor], prefix: str, n_experts: int) -> dict[str, Tensor]:
    """A layer's experts as stacks w1, w3 (E, F, D) and w2 (E, D, F), from per-expert tensors
    (Mixtral's files) or transformers 5's fused `gate_up_proj` (E, 2F, D) / `down_proj` (E, D, F)."""
    fused = prefix + "mlp.experts.gate_up_proj"
    if fused in hf:
        w1, w3 = take(fused).chunk(2, dim=1)
        return {"w1": w1, "w3": w3, "w2": take(prefix + "mlp.experts.down_proj")}
    moe = prefix + "block_sparse_moe.experts."
    return {w: torch.stack([take(f"{moe}{e}.{w}.weight") for e in range(n_experts)]) for w in ("w1", "w2", "w3")}


def read_hf_tensors(folder: Path) -> dict[str, Tensor]:
    """Every tensor of a folder's model.safetensors, or of the shards its index lists."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors (or model.safetensors.index.json) there; "
                                f"only safetensors weights are read")
    tensors: dict[str, Tensor] = {}
    for shard in shards:
        tensors.update(load_file(str(folder / shard)))
    return tensors


# ---- the two commands -----------------------------------------------------------------------

def write_tokenizer(folder: Path, tokenizer: Tokenizer, max_len: int) -> None:
    """Our tokenizer.json, with a post-processor that starts every text with <|endoftext|> as
    generate.py starts every prompt (so transformers' `tokenizer(prompt)` gives the ids we generate
    from), and the config that makes `AutoTokenizer` load it as a fast tokenizer with
    <|endoftext|> as its begin / end token, <|pad|> for padding, and GPT-2's byte-level
    pre-tokenizer settings (no prefix space), which are the ones it uses."""
    exported = Tokenizer.from_str(tokenizer.to_str())
    exported.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B", special_tokens=[(EOT, tokenizer.token_to_id(EOT))])
    (folder / "tokenizer.json").write_text(exported.to_str())
    special = {"bos_token": EOT, "eos_token": EOT, "pad_token": PAD}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
              "clean_up_tokenization_spaces": False, "add_bos_token": True, "add_eos_token": False,
              "add_prefix_space": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def without_post_processor(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer as ours are: the code that encodes a prompt adds <|endoftext|> itself."""
    raw = json.loads(tokenizer.to_str())
    raw["post_processor"] = None
    return Tokenizer.from_str(json.dumps(raw))


def export(checkpoint: str | Path, out: str | Path, warn=print) -> Path:
    """Write a checkpoint as a Hugging Face Mixtral folder: config.json, model.safetensors and the
    tokenizer. The folder appears whole or not at all."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: choose another --out or remove it")
    folder = ckpt.resolve_checkpoint(checkpoint)
    model, tokenizer = ckpt.load_for_inference(folder)
    if model.cfg.vision is not None:
        warn(f"note: {folder} has a vision branch; Mixtral is text-only, so only the text model is exported")
    eot, pad = tokenizer.token_to_id(EOT), tokenizer.token_to_id(PAD)
    hf_config = to_hf_config(model.cfg, eot, pad)
    with atomic_folder(out) as tmp:
        hf_config.save_pretrained(tmp)
        save_file(to_hf_weights(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_tokenizer(tmp, tokenizer, model.cfg.max_seq_len)
    return out


def import_(hf_dir: str | Path, out: str | Path) -> Path:
    """A Hugging Face Mixtral folder as a run directory holding one checkpoint (step 0), for
    generate.py, bench.py and `train.py --init-from`."""
    hf_dir, out = Path(hf_dir), Path(out)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json there (expected a Hugging Face model folder)")
    if ckpt.list_checkpoints(out):
        raise ckpt.CheckpointError(f"{out} already holds checkpoints: choose another --out")
    transformers_module()  # the same requirement both ways
    cfg = from_hf_config(json.loads((hf_dir / "config.json").read_text()), hf_dir / "config.json")
    tokenizer = without_post_processor(load_tokenizer(hf_dir / "tokenizer.json"))
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise ConfigError(f"{hf_dir}: tokenizer has {tokenizer.get_vocab_size()} tokens, more than "
                          f"vocab_size={cfg.vocab_size}")
    with torch.device("meta"):
        model = MoETransformer(cfg)
    weights = from_hf_weights(cfg, read_hf_tensors(hf_dir), hf_dir)
    expected = model.state_dict()
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise ckpt.CheckpointError(f"{hf_dir}: tensor for {name} has shape {tuple(tensor.shape)}, "
                                       f"expected {tuple(expected[name].shape)} from config.json")
    model = MoETransformer.from_state_dict(cfg, weights)
    config = Config(model=cfg)
    state = {"step": 0, "imported_from": str(hf_dir)}  # no optimizer: start training with --init-from
    return ckpt.save_checkpoint(out, 0, model, state, config, tokenizer, keep=1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moe.hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("export", help="a checkpoint -> a Hugging Face Mixtral folder")
    p.add_argument("--checkpoint", required=True, help="a run directory or checkpoint folder")
    p.add_argument("--out", required=True, metavar="HF_DIR", help="the folder to write (must not hold files)")
    p = sub.add_parser("import", help="a Hugging Face Mixtral folder -> a run directory")
    p.add_argument("--hf", required=True, metavar="HF_DIR", help="a local folder: config.json, safetensors, tokenizer.json")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the run directory to write")
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", help="show full tracebacks on error")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "export":
        print(f"wrote {export(args.checkpoint, args.out)}")
    else:
        print(f"wrote {import_(args.hf, args.out)}")
    return 0


if __name__ == "__main__":
    run(main)
