"""The training loop, the same on CPU and CUDA.

AdamW with warmup + cosine, gradient clipping and accumulation, a batch size that ramps up
with the tokens seen, bf16 autocast where the device multiplies bf16 faster (`train.precision`),
periodic evaluation and atomic checkpoints. Every quantity that decides a step (learning rate, batch size, which sequences)
is a function of the step and counters stored in the checkpoint, and the data is sampled
statelessly, so a resumed run continues bit for bit where the killed one stopped.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .. import checkpoint as ckpt
from ..cli import Interrupted
from ..config import Config, ConfigError, TrainConfig
from ..data.captions import CaptionData
from ..data.corpus import prepare_data
from ..hardware import autocast, matmul_peak, resolve_precision
from ..infer.sampling import SamplingParams, generate
from ..model import MoETransformer
from ..model.params import Kind, is_vision, param_kind
from ..tokenizer import EOT, IMAGE_ID
from . import distributed
from .evaluate import caption_accuracy
from .stopping import StopSignals


@dataclass
class RunOptions:
    """What the command line decides beyond the config."""

    out: Path
    device: torch.device
    resume_from: Path | None = None  # a checkpoint folder: continue that run exactly
    init_from: Path | None = None  # a checkpoint folder: start a new run from its weights
    compile: bool = False
    peak_flops: float | None = None  # FLOP/s for MFU; measured by a matmul probe when None
    quiet: bool = False
    world: distributed.World = field(default_factory=distributed.World)  # this process among torchrun's


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then a cosine down to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def batch_size_at(tokens_seen: int, cfg: TrainConfig) -> int:
    """Sequences per step: from batch_size_start up to batch_size, linearly over ramp_tokens."""
    if cfg.ramp_tokens == 0 or tokens_seen >= cfg.ramp_tokens:
        return cfg.batch_size
    grown = (cfg.batch_size - cfg.batch_size_start) * tokens_seen / cfg.ramp_tokens
    return cfg.batch_size_start + int(grown)


class Trainer:
    def __init__(self, config: Config, options: RunOptions):
        self.config, self.options = config, options
        self.cfg, mcfg = config.train, config.model
        self.device = options.device
        try:
            self.dtype = resolve_precision(self.cfg.precision, self.device)  # before any slow stage
        except ValueError as e:
            raise ConfigError(f"train.{e}") from None
        if distributed.any_rank(self.dtype == torch.float32, options.world):  # `auto` probed each rank alike?
            self.dtype = torch.float32  # every rank must compute alike: fp32 unless all found bf16 fast
        self.out = Path(options.out)
        self.out.mkdir(parents=True, exist_ok=True)
        source = options.resume_from or options.init_from
        tokenizer = ckpt.load_checkpoint_tokenizer(source) if source else None
        say = None if options.quiet or not options.world.is_main else to_stderr  # a first run's slow stages
        self.tokenizer, self.data = prepare_data(config.data, mcfg, self.cfg.seed, tokenizer, say)

        torch.manual_seed(self.cfg.seed)
        self.model = MoETransformer(mcfg)
        if source:  # a text checkpoint may start a vision run: the new branch keeps its initial weights
            ckpt.load_weights(source, self.model, may_lack=is_vision if options.init_from else None)
        if self.cfg.freeze_lm:
            if self.model.vision is None:
                raise ConfigError("train.freeze_lm=true: the model has no vision branch to train (add [model.vision])")
            for name, p in self.model.named_parameters():
                p.requires_grad_(is_vision(name))
        self.model.to(self.device)
        self.world = world = options.world
        # A step's sequences are shared among the data-parallel replicas; under pp each replica
        # takes whole micro-batches, which the pipeline cuts into train.pp_microbatches.
        self.batch_unit = world.degree("dp") * (self.cfg.micro_batch_size if self.cfg.pp > 1 else 1)
        for name in ("batch_size_start", "batch_size"):
            if getattr(self.cfg, name) % self.batch_unit:
                share = f"{world.degree('dp')} data-parallel replicas" + (
                    f" x train.micro_batch_size={self.cfg.micro_batch_size} (whole micro-batches in a pipeline)"
                    if self.cfg.pp > 1 else "")
                raise ConfigError(f"train.{name}={getattr(self.cfg, name)} does not divide evenly among the {share} "
                                  f"(the ramp's sizes in between are rounded down to a multiple)")
        self.pipeline = None
        if world.mesh is not None:  # tensor and pipeline parallelism; every rank: same init
            if options.compile:
                raise ConfigError("--compile does not combine with train.tp or train.pp yet")
            self.forward, self.pipeline = distributed.lay_out(self.model, world, config, self.device, self.dtype)
        else:
            self.forward = distributed.wrap(self.model, world, self.cfg.parallel, self.device)  # every rank: same init
        self.forward = torch.compile(self.forward) if options.compile else self.forward
        self.optimizer = self._make_optimizer()
        self.encoder_params = [p for name, p in self.model.named_parameters()
                               if param_kind(name) == Kind.VISION_ENCODER and p.requires_grad]
        self.step = self.tokens_seen = self.sequences_drawn = 0
        self.skipped_steps = self.rollbacks = self.bad_in_a_row = 0  # non-finite steps (train_step)
        if options.resume_from:
            state = ckpt.load_trainer_state(options.resume_from)
            if "optimizer" not in state:
                raise ckpt.CheckpointError(f"{options.resume_from} holds weights only (imported from "
                                           f"{state.get('imported_from', 'elsewhere')}): start a run from it "
                                           f"with --init-from instead of --resume")
            distributed.load_optimizer_state(self.model, self.optimizer, self.param_names, state["optimizer"], world)
            torch.set_rng_state(state["rng"])
            if "cuda_rng" in state and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
            self.step, self.tokens_seen, self.sequences_drawn = state["step"], state["tokens_seen"], state["sequences_drawn"]
            self.skipped_steps, self.rollbacks = state.get("skipped_steps", 0), state.get("rollbacks", 0)
        self.seq_len = mcfg.max_seq_len
        self.flops_per_token = self.model.flops_per_token(self.seq_len, training=True, vision=bool(config.data.images))
        self.flops_per_image = self.model.flops_per_image(training=True)
        self.flops_per_held_image = self.model.flops_per_image(training=False)  # no backward through the encoder
        self.peak_flops = options.peak_flops or matmul_peak(self.device, dtype=self.dtype)  # the precision's own
        self.peak_flops *= world.size  # the roofline of all the ranks together
        self.metrics_file = open(self.out / "metrics.jsonl", "a") if world.is_main else None
        tensorboard = self.cfg.tensorboard and world.is_main
        self.tensorboard = tensorboard_writer(self.out / "tensorboard") if tensorboard else None

    def _make_optimizer(self) -> torch.optim.Optimizer:
        trainable = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        gates = [name for name in trainable if param_kind(name) == Kind.VISION_GATE]
        decay = [name for name, p in trainable.items() if p.dim() >= 2]  # matrices and expert stacks
        no_decay = [name for name, p in trainable.items() if p.dim() < 2 and name not in gates]
        groups = [(decay, {"weight_decay": self.cfg.weight_decay}), (no_decay, {"weight_decay": 0.0})]
        if gates:
            # The vision gates start at 0, where the sign of every gradient behind them flips with
            # theirs; at the common rate they hover there and the branch learns nothing for hundreds
            # of steps. Adam moves a parameter about lr a step, so they get a larger rate.
            groups.append((gates, {"weight_decay": 0.0, "lr_scale": self.cfg.gate_lr_scale}))
        self.param_names = [name for names, _ in groups for name in names]  # the optimizer's order
        param_groups = [{"params": [trainable[n] for n in names], **options} for names, options in groups]
        return distributed.make_optimizer(param_groups, self.world, self.cfg.parallel, lr=self.cfg.lr,
                                          betas=(self.cfg.beta1, self.cfg.beta2))

    @property
    def precision(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    def autocast(self) -> torch.autocast:
        return autocast(self.device, self.dtype)

    # ---- the loop ---------------------------------------------------------------------------

    def train(self) -> dict:
        cfg = self.cfg
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=self.options.quiet or not self.world.is_main,
                   mininterval=1 if sys.stderr.isatty() else 30)
        started, interval, whole = time.perf_counter(), Meter(), Meter()
        # A fresh or --init-from run evaluates first: the "before" of a fine-tune.
        evaluation = self.evaluate(bar) if self.step == 0 else {}
        with StopSignals() as stop:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                record = self.train_step()
                if not record["finite"] and self.world.is_main:
                    bar.write(f"step {self.step}: non-finite loss or gradient, step skipped "
                              f"({self.skipped_steps} skipped so far)")
                for meter in (interval, whole):
                    meter.add(record, time.perf_counter() - t0)
                bar.update(1)
                last = self.step == cfg.max_steps
                if self.step % cfg.log_every == 0 or last:
                    self.log(record, interval, bar)
                    interval = Meter()
                if self.step % cfg.eval_every == 0 or last:
                    evaluation = self.evaluate(bar)
                folder = self.save() if self.step % cfg.ckpt_every == 0 or last else None
                if not last and self.stop_asked(stop):
                    bar.close()
                    raise self.stopped(stop.received, folder or self.save())
        bar.close()
        if not evaluation:  # nothing left to train (a resume of a finished run)
            evaluation = self.evaluate(bar)
        summary = {"type": "summary", "steps": self.step, "tokens_seen": self.tokens_seen,
                   "wall_s": time.perf_counter() - started, **evaluation,
                   "tokens_per_s": whole.tokens_per_s, "mfu": self.mfu(whole),
                   "skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks,
                   "precision": self.precision, "peak_flops": self.peak_flops, "run_dir": str(self.out)}
        self.write(summary)
        return summary

    def stop_asked(self, stop: StopSignals) -> bool:
        """Whether a signal asked this run to stop (under torchrun: any rank's, so all stop alike)."""
        return distributed.any_rank(stop.received is not None, self.world)

    def stopped(self, signum: int | None, folder: Path) -> Interrupted:
        name = signal.Signals(signum).name if signum else "a signal on another rank"
        return Interrupted(f"stopped by {name} after step {self.step}; its checkpoint is {folder}: continue with "
                           f"python train.py --out {self.out} --resume", 128 + (signum or signal.SIGTERM))

    def mfu(self, meter: Meter) -> float | None:
        """Achieved FLOP/s over the peak, never above 1. A span faster than the peak means the peak
        was probed while the machine was busy (or --peak-flops was low): it is probed again, and
        is never taken below what the machine was just seen to do."""
        if not meter.seconds:
            return None
        achieved = meter.flops / meter.seconds
        if achieved > self.peak_flops:
            self.peak_flops = max(matmul_peak(self.device, dtype=self.dtype) * self.world.size, achieved)
        return achieved / self.peak_flops

    def log(self, record: dict, interval: Meter, bar: tqdm) -> None:
        log = {"type": "train", "step": self.step, **interval.mean_losses(),
               **{k: record[k] for k in ("lr", "batch_size", "skipped_steps", "rollbacks")},
               "tokens_seen": self.tokens_seen, "tokens_per_s": interval.tokens_per_s,
               "mfu": self.mfu(interval), "precision": self.precision, "peak_flops": self.peak_flops,
               **expert_load(interval.expert_tokens, record["dropped"])}
        self.write(log)
        bar.set_postfix(loss=f"{log['loss']:.3f}", tok_s=f"{log['tokens_per_s']:.0f}", mfu=f"{log['mfu']:.0%}",
                        refresh=False)

    def train_step(self) -> dict:
        """One optimizer step over batch_size_at(tokens_seen) sequences, in micro-batches (under
        torchrun each rank takes its own slice of them; the step is the same)."""
        cfg, world = self.cfg, self.world
        n_seqs = batch_size_at(self.tokens_seen, cfg)
        n_seqs = max(n_seqs // self.batch_unit, 1) * self.batch_unit  # an equal share for every replica
        mine = n_seqs // world.degree("dp")
        first_seq = self.sequences_drawn + world.coordinate("dp") * mine
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        # Behind gates at 0 the encoder's gradients are noise, and Adam turns noise into full-size
        # steps: trained from the first step, the ViT and resampler lose most of what their random
        # features show (a linear probe reads colour and shape from them far better at step 0 than
        # at step 300) and captioning stalls for hundreds of steps. Held still (and skipped by the
        # backward pass) until the branch has learned to read them, they then train on real signal.
        held = self.step < cfg.encoder_hold_steps
        for p in self.encoder_params:
            p.requires_grad_(not held)
        totals = dict.fromkeys(Meter.LOSSES, 0.0)
        expert_tokens, dropped, n_images = None, None, 0
        for first in range(0, mine, cfg.micro_batch_size):
            n = min(cfg.micro_batch_size, mine - first)
            batch = self.data.batch(first_seq + first, n, self.seq_len)
            images = None
            if batch.images is not None:
                images = batch.images.to(self.device, non_blocking=True)
                n_images += int((batch.inputs == IMAGE_ID).sum())
            inputs, targets = batch.inputs.to(self.device), batch.targets.to(self.device)
            with self.autocast():
                if self.pipeline is not None:
                    values, counts, drops = self.pipeline.train(inputs, targets, weight=n / mine)
                else:
                    out = self.forward(inputs, targets, images=images)
                    (out.loss * (n / mine)).backward()
                    values = torch.stack([getattr(out, key).detach().float() for key in totals]).tolist()  # one sync
                    counts = [s.tokens_per_expert for s in out.router_stats]
                    drops = [s.dropped for s in out.router_stats]
            for key, value in zip(totals, values):
                totals[key] += value * n / mine
            expert_tokens = counts if expert_tokens is None else [a + b for a, b in zip(expert_tokens, counts)]
            dropped = drops if dropped is None else [a + b for a, b in zip(dropped, drops)]
        distributed.sync_gradients(self.model, world)
        if world.distributed:  # what all the ranks did together (so every rank decides alike below)
            totals = dict(zip(totals, distributed.mean(list(totals.values()), world)))
            expert_tokens, dropped = distributed.total(expert_tokens, world), distributed.total(dropped, world)
        norm = distributed.clip_grad_norm(self.model, cfg.grad_clip if cfg.grad_clip > 0 else math.inf, world)
        finite = math.isfinite(totals["loss"]) and math.isfinite(float(distributed.whole(norm)))
        if finite:
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:  # a NaN or inf would poison the weights and Adam's moments for good: skip the step
            self.skipped_steps += 1
            self.bad_in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.sequences_drawn += n_seqs  # the batch is spent either way: a bad one is not seen again
        self.tokens_seen += n_seqs * self.seq_len
        if self.bad_in_a_row >= cfg.max_bad_steps:
            self.roll_back()
        if world.distributed:
            n_images = int(distributed.total([torch.tensor(n_images)], world)[0])
        flops = n_seqs * self.seq_len * self.flops_per_token
        flops += n_images * (self.flops_per_held_image if held else self.flops_per_image)
        return {**totals, "lr": lr, "batch_size": n_seqs, "tokens": n_seqs * self.seq_len, "flops": flops,
                "finite": finite, "skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks,
                "expert_tokens": [c.cpu() for c in expert_tokens], "dropped": [int(d) for d in dropped]}

    def roll_back(self) -> None:
        """After max_bad_steps non-finite steps in a row: the weights and optimizer state of the last
        good checkpoint, as large runs do. The step and data counters go on, so the batches that
        broke those steps are skipped."""
        cfg, world = self.cfg, self.world
        folder = ckpt.latest_checkpoint(self.out, warn=lambda _: None)
        problem = f"{self.bad_in_a_row} steps in a row with a non-finite loss or gradient (to step {self.step})"
        if folder is None:
            raise ConfigError(f"{problem} and no checkpoint to roll back to: lower train.lr or check the data")
        if world.distributed and (cfg.parallel == "fsdp" or not world.whole_model):
            layout = "expert parallelism" if world.expert_parallel > 1 else "tensor or pipeline parallelism"
            raise ConfigError(f"{problem}; under {cfg.parallel if world.whole_model else layout} "
                              f"training stops here: continue from {folder} with --resume")
        ckpt.load_weights(folder, self.model)
        distributed.load_optimizer_state(self.model, self.optimizer, self.param_names,
                                         ckpt.load_trainer_state(folder)["optimizer"], world)
        self.rollbacks += 1
        self.bad_in_a_row = 0
        self.write({"type": "rollback", "step": self.step, "to": folder.name, "skipped_steps": self.skipped_steps})
        if world.is_main:
            tqdm.write(f"step {self.step}: {problem}; rolled back to {folder.name} and going on past that data")

    @torch.no_grad()
    def evaluate(self, bar: tqdm | None = None) -> dict:
        """Validation loss on fixed held-out sequences, and bits per byte (tokenizer-independent)."""
        self.model.eval()
        total, weight = 0.0, 0
        for i in range(self.cfg.eval_batches):
            n = self.cfg.micro_batch_size
            batch = self.data.batch(i * n, n, self.seq_len, split="val")
            images = None if batch.images is None else batch.images.to(self.device)
            inputs, targets = batch.inputs.to(self.device), batch.targets.to(self.device)
            with self.autocast():
                if self.pipeline is not None:
                    ce = self.pipeline.evaluate(inputs, targets)
                else:
                    ce = self.model(inputs, targets, images=images).ce_loss.item()
            counted = int((batch.targets != -100).sum())
            total += ce * counted
            weight += counted
        val_loss = total / weight
        result = {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) / self.data.bytes_per_token}
        message = f"step {self.step}: val loss {val_loss:.4f}, {result['val_bpb']:.3f} bits per byte"
        if isinstance(self.data, CaptionData):
            with self.autocast():
                result["caption_acc"] = caption_accuracy(self.model, self.data.held_out, self.data)
                result["caption_acc_blank"] = caption_accuracy(self.model, self.data.held_out, self.data, blank=True)
            message += (f", caption accuracy {result['caption_acc']:.1%} on {len(self.data.held_out)} held-out "
                        f"images ({result['caption_acc_blank']:.1%} with blank images)")
        self.model.train()
        self.write({"type": "eval", "step": self.step, **result})
        if bar is not None and self.world.is_main:
            bar.write(message)
        return result

    def save(self) -> Path:
        """A whole checkpoint, written by rank 0 (every rank takes part in gathering it)."""
        world, parallel = self.world, self.cfg.parallel
        optimizer = distributed.full_optimizer_state(self.optimizer, self.param_names, world, parallel)
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "sequences_drawn": self.sequences_drawn,
                 "skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks,
                 "optimizer": optimizer, "rng": torch.get_rng_state()}
        if self.device.type == "cuda":  # router jitter draws from the device's generator there
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        model = self.model
        if world.distributed:
            weights = distributed.full_model_state(self.model, world)
            model = MoETransformer.from_state_dict(self.config.model, weights) if world.is_main else None
        folder = ckpt.checkpoint_dir(self.out) / f"step-{self.step:07d}"
        if world.is_main:
            folder = ckpt.save_checkpoint(self.out, self.step, model, state, self.config, self.tokenizer,
                                          self.cfg.keep_checkpoints)
        world.barrier()  # no rank runs ahead of a checkpoint that may yet fail
        return folder

    def sample(self, max_new_tokens: int, prompt: str = "") -> str:
        """Text generated from the model (from the start of a document when there is no prompt);
        for image-caption data, greedy captions of a few held-out images beside the truth."""
        eot = self.tokenizer.token_to_id(EOT)
        self.model.eval()
        if isinstance(self.data, CaptionData):
            params = SamplingParams(max_new_tokens, temperature=0, stop_tokens=(eot,))
            lines = []
            for image, caption in self.data.held_out[:8]:
                with self.autocast():
                    tokens = list(generate(self.model, [eot, IMAGE_ID], params, images=image[None]))
                lines.append(f"{caption!r:>24} -> {self.tokenizer.decode(tokens)!r}")
            self.model.train()
            return "held-out image's caption -> the model's (greedy)\n" + "\n".join(lines)
        start = [eot, *self.tokenizer.encode(prompt).ids]
        params = SamplingParams(max_new_tokens, temperature=0.8, top_k=50, stop_tokens=(eot,), seed=self.cfg.seed)
        with self.autocast():
            tokens = list(generate(self.model, start, params))
        self.model.train()
        return prompt + self.tokenizer.decode(tokens)

    def close(self) -> None:
        """Close metrics.jsonl and the TensorBoard writer (and its thread); every record is already
        flushed, so this loses nothing, but a process that trains many runs keeps no file or thread
        per run."""
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, record: dict) -> None:
        if self.metrics_file is None:  # not rank 0
            return
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.tensorboard is not None:
            step = record.get("step", self.step)  # the summary counts "steps"
            for key, value in record.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and key not in ("step", "steps"):
                    self.tensorboard.add_scalar(f"{record['type']}/{key}", value, step)
            for layer, cv in enumerate(record.get("expert_cv") or []):  # how unevenly each layer's experts are used
                self.tensorboard.add_scalar(f"experts/load_cv_layer_{layer}", cv, step)
            self.tensorboard.flush()


def tensorboard_writer(folder: Path):
    """A TensorBoard SummaryWriter logging into `folder` (train.tensorboard = true)."""
    try:  # optional (the tensorboard extra), so imported only when asked for
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.tensorboard = true needs the tensorboard extra: pip install -e '.[tensorboard]'") from None
    return SummaryWriter(str(folder))


class Meter:
    """Sums over a span of steps: time, tokens, FLOPs, the loss and its parts, tokens per expert."""

    LOSSES = ("loss", "ce_loss", "balance_loss", "z_loss")

    def __init__(self):
        self.seconds, self.tokens, self.flops, self.steps = 0.0, 0, 0, 0
        self.losses = dict.fromkeys(self.LOSSES, 0.0)
        self.expert_tokens: list[torch.Tensor] = []

    def add(self, record: dict, seconds: float) -> None:
        self.seconds += seconds
        self.tokens += record["tokens"]
        self.flops += record["flops"]
        for key in self.LOSSES:
            self.losses[key] += record[key]
        self.steps += 1
        counts = record["expert_tokens"]
        self.expert_tokens = [a + b for a, b in zip(self.expert_tokens, counts)] if self.expert_tokens else counts

    def mean_losses(self) -> dict[str, float]:
        """The loss and its parts averaged over the same steps, so loss = ce_loss + the weighted rest."""
        return {key: total / self.steps for key, total in self.losses.items()}

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds else None


def expert_load(tokens_per_expert: list[torch.Tensor], dropped: list[int]) -> dict:
    """Per MoE layer: each expert's share of the assignments, their coefficient of variation, drops."""
    shares, cvs = [], []
    for counts in tokens_per_expert:
        counts = counts.double()
        shares.append([round(x, 4) for x in (counts / counts.sum()).tolist()])
        cvs.append(round((counts.std(correction=0) / counts.mean()).item(), 4))
    return {"expert_share": shares, "expert_cv": cvs, "dropped": dropped}
