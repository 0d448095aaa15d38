"""The LightningModule: wires the tokenizer, the objective and the validation metrics. It composes; the
components compute."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from tokzoo.catalogue import absent_metrics
from tokzoo.distributed import all_reduce_sum, gather_rows, world_size
from tokzoo.errors import NonFiniteLossError
from tokzoo.lit.param_groups import freeze_parts, lr_multipliers, parameter_groups
from tokzoo.losses.contrastive import caption_ids
from tokzoo.losses.objective import TokenizerObjective, gradient_conflict
from tokzoo.metrics import (
    CodebookUsage,
    FidelityMetrics,
    TokenDiagnostics,
    linear_probe_accuracy,
    noise_at_psnr,
    retrieval_recall_at_1,
    zero_shot_accuracy,
)
from tokzoo.model import TokenizerOutput, UnifiedTokenizer


def adamw(groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.AdamW:
    """AdamW with the fused kernel where the parameters' device supports it (same update, one kernel: 3.4x
    faster than the default foreach step on this 2-core CPU for the default config's 7.6M parameters)."""
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def gather_chunks(chunks: list[Tensor]) -> Tensor | None:
    """torch.cat(chunks) of every rank, in rank order; None when no rank holds any. Every rank must call it, also
    one with no chunks (DDP validation without padding can leave a rank without batches): it learns the rows'
    shape and dtype from the others and sends none."""
    local = torch.cat(chunks) if chunks else None
    if world_size() <= 1:
        return local
    import torch.distributed as dist

    metas: list[Any] = [None] * world_size()
    dist.all_gather_object(metas, None if local is None else (tuple(local.shape[1:]), local.dtype, str(local.device)))
    meta = next((m for m in metas if m is not None), None)
    if meta is None:
        return None
    if local is None:
        shape, dtype, _ = meta
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        local = torch.zeros((0, *shape), dtype=dtype, device=device)
    return gather_rows(local)


class TokenizerModule(L.LightningModule):
    flops_per_batch = None  # Lightning's ThroughputMonitor asks for it; FLOPs are counted by the benchmarks instead

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.config = config
        supervision = config["loss"]["supervision"]
        self.model = UnifiedTokenizer(
            config["model"], use_decoder=supervision != "contra", use_text=supervision != "recon"
        )
        # Parts with optim.lr_mult 0 (or model.text.lock) are frozen before anything reads requires_grad.
        self.lr_mults = lr_multipliers(config)
        self.frozen_parts = freeze_parts(self.model, self.lr_mults)
        self.objective = TokenizerObjective(
            config["loss"], config["trainer"]["max_steps"], lpips=config["eval"]["lpips"]
        )
        ev = config["eval"]
        self.fidelity = FidelityMetrics(lpips=ev["lpips"], rfid=ev["rfid"]) if self.model.decoder is not None else None
        sizes = self.model.quantizer.codebook_sizes
        self.codebook_usage = CodebookUsage(sizes) if sizes else None
        self.tokens = TokenDiagnostics(sizes) if sizes and ev["token_diagnostics"] else None
        # metric name -> why it is not logged (tagged on the MLflow run): the catalogue's rules for this config, then
        # what the parts found at build time (missing weights) and validation finds (no labels, too few images)
        self.absent: dict[str, str] = absent_metrics(config)
        self.absent.update({f"train/{k}": v for k, v in self.objective.absent.items()})
        if self.fidelity is not None:
            self.absent.update({f"val/{k}": v for k, v in self.fidelity.absent.items()})
        if len(sizes) == 1:
            self.absent.setdefault("val/code_mi_bits", "one code per token: no pair of codes to relate")
        if config["compile"]:
            # In place (nn.Module.compile): parameter names and checkpoints stay the same as uncompiled. The
            # quantizer stays eager: its host-side bookkeeping and data-dependent updates would break graphs.
            for part in (self.model.encoder, self.model.decoder, self.model.text_tower):
                if part is not None:
                    part.compile()
        self.class_names: list[str] | None = None
        self.prompt_templates: list[str] = ["a photo of a {}."]
        self.attribute_tasks: dict[str, Any] = {}  # name -> data.common.AttributeTask (batch["attributes"] order)
        self.chance: dict[str, float] = {}  # accuracy metric -> its chance level (1 / classes), tagged on the run
        self.grid_path: Path | None = None  # where validation writes originals vs reconstructions
        self._val: dict[str, list[Tensor]] = {}
        self._val_images = 0  # images this rank scored in the current validation epoch
        self.skipped_samples = 0  # unreadable train samples replaced so far, all ranks (train/skipped_samples)
        self._rng_after_step: dict[str, Any] | None = None  # torch's RNG after the last step (saved in checkpoints)
        self._rng_to_restore: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "class_names", None):
            self.class_names = list(datamodule.class_names)
            self.prompt_templates = list(datamodule.prompt_templates or self.prompt_templates)
            self.attribute_tasks = getattr(datamodule, "attribute_tasks", None) or {}

    # ---- training --------------------------------------------------------------------------------------------
    def loss_terms(self, batch: dict[str, Any], step: int) -> tuple[TokenizerOutput, dict[str, Tensor]]:
        """The forward and the objective of one training step: what training_step runs, and what the benchmarks
        time. terms["loss"] is the total; the other terms are logged separately."""
        images = batch["image"]
        captions = batch["caption"] if self.model.text_tower is not None else None
        out = self.model(images, captions, recon_rows=self.objective.recon_rows(images.shape[0]))
        ids = caption_ids(captions, images.device) if captions is not None else None  # duplicates: contrastive
        return out, self.objective(out, images, step, caption_ids=ids)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        # Train batches are always full (the data layer replaces unreadable samples), so every rank runs every
        # step and its collectives; there is no "skip this step" path that one rank could take alone.
        images = batch["image"]
        out, terms = self.loss_terms(batch, self.global_step)
        loss = terms["loss"]
        self._check_finite(loss, terms)
        every = self.config["loss"]["grad_cos_every"] if "encoder" not in self.frozen_parts else 0
        if every and "loss_contra" in terms and "loss_recon" in terms and self.global_step % every == 0:
            shared = [p for p in self.model.encoder.parameters() if p.requires_grad]
            conflict = gradient_conflict(terms["loss_recon"], terms["loss_contra"], shared)
            # Written at the step it was measured (self.log would defer it to the next logging interval).
            if self.trainer.is_global_zero:
                for logger in self.loggers:
                    logger.log_metrics({f"train/{k}": float(v) for k, v in conflict.items()}, step=self.global_step)
        bsz = images.shape[0]
        self.log("train/loss", terms.pop("loss").detach(), batch_size=bsz, prog_bar=True)
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, batch_size=bsz)
        stats = out.quant.stats
        if stats and self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.log_dict({f"train/{k}": v for k, v in stats.items() if "/" not in k}, batch_size=bsz)
        self._count_skipped(int(batch.get("skipped", 0)))
        if self.model.logit_scale is not None:
            self.log("train/logit_scale", self.model.logit_scale_value().detach(), batch_size=bsz)
        return loss

    def _count_skipped(self, skipped: int) -> None:
        """train/skipped_samples: unreadable samples replaced so far in the run, summed over ranks. Logged every
        step, on every rank (a collective-safe reduction), and cumulative, so the run's last value is the total
        whichever steps the logger keeps; saved in checkpoints, so a resumed run counts on."""
        count = torch.tensor(float(skipped), device=self.device)
        if self.trainer.world_size > 1:
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
        self.skipped_samples += int(count.item())
        self.log("train/skipped_samples", float(self.skipped_samples), batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokzoo_skipped_samples"] = self.skipped_samples
        # torch's RNG as the last training step left it (before validation and loader start-up drew from it): a
        # resumed or budget-continued run then takes the same draws (dead-code restarts, dropout) as an unbroken one
        if self._rng_after_step is not None:
            checkpoint["tokzoo_rng"] = self._rng_after_step

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_samples = int(checkpoint.get("tokzoo_skipped_samples", 0))
        self._rng_to_restore = checkpoint.get("tokzoo_rng")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:  # the first step after a restore
            torch.set_rng_state(self._rng_to_restore["cpu"])
            if "cuda" in self._rng_to_restore and len(self._rng_to_restore["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(self._rng_to_restore["cuda"])
            self._rng_to_restore = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._rng_after_step = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._rng_after_step["cuda"] = torch.cuda.get_rng_state_all()

    def _check_finite(self, loss: Tensor, terms: dict[str, Tensor]) -> None:
        """Stop before a NaN/Inf loss reaches the weights (and the next checkpoint); all ranks decide together."""
        finite = bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items() if v.numel() == 1)
            raise NonFiniteLossError(
                f"loss became non-finite at step {self.global_step} ({values}); lower optim.lr, check the data, "
                f"or use precision 32-true; a changed config starts afresh. The previous rolling checkpoint is kept "
                f"(rerunning the same config resumes from it)."
            )

    # ---- validation ------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = {"image_emb": [], "text_emb": [], "caption_ids": [], "codes": [], "labels": [], "attributes": []}
        self._val_images = 0
        if self.fidelity is not None:
            self.fidelity.reset()
        if self.codebook_usage is not None:
            self.codebook_usage.reset()
        if self.tokens is not None:
            self.tokens.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # No collective in here: under DDP the ranks may hold different numbers of val batches (ValSplitSampler
        # does not pad), so everything cross-rank happens once, in on_validation_epoch_end.
        images = batch["image"]
        if images.shape[0] == 0:
            return  # every sample of this val batch was unreadable (counted by collate_samples)
        self._val_images += images.shape[0]
        out = self.model(images, batch["caption"] if self.config["eval"]["retrieval"] else None)
        if out.recon is not None:
            self.fidelity.update(out.recon, images)
            if batch_idx == 0 and self.grid_path is not None and self.trainer.is_global_zero:
                self._save_grid(images, out.recon)
        if self.codebook_usage is not None:
            self.codebook_usage.update(out.quant.indices)
        if self.tokens is not None:
            self.tokens.update(out.quant.indices, batch["label"], self._noisy_codes(images, batch_idx))
        self._val["codes"].append(out.pooled_codes.float())
        self._val["labels"].append(batch["label"])
        if self.attribute_tasks and "attributes" in batch:
            self._val["attributes"].append(batch["attributes"])
        if out.image_emb is not None:
            self._val["image_emb"].append(out.image_emb.float())
            if self.config["eval"]["retrieval"]:
                self._val["text_emb"].append(out.text_emb.float())
                self._val["caption_ids"].append(caption_ids(batch["caption"], images.device))

    def on_validation_epoch_end(self) -> None:
        metrics: dict[str, float] = {}
        if self.fidelity is not None:
            metrics.update(self.fidelity.compute())
            self.absent.update({f"val/{k}": v for k, v in self.fidelity.absent.items()})
        if self.codebook_usage is not None:
            metrics.update(self.codebook_usage.compute())
            metrics["bits_per_token"] = self.model.quantizer.bits_per_token
        if self.tokens is not None:
            metrics.update(self.tokens.compute())
        # Gathered on every rank whether or not it holds rows: a rank with no val batch must still take part.
        gathered = {key: gather_chunks(chunks) for key, chunks in self._val.items()}
        if gathered["text_emb"] is not None:
            metrics["retrieval_r1"] = retrieval_recall_at_1(
                gathered["image_emb"], gathered["text_emb"], gathered["caption_ids"]
            )
        labels = gathered["labels"]
        if labels is not None and bool((labels >= 0).all()) and labels.numel() >= 4:
            metrics.update(self._classification(gathered, labels))
        else:
            for key in ("linprobe_acc", "zeroshot_acc"):
                self.absent.setdefault(f"val/{key}", "the validation data has no class labels")
        # the images scored, over all ranks: exactly the validation set (no sampler padding), less unreadable ones
        metrics["num_images"] = float(all_reduce_sum(torch.tensor(self._val_images, device=self.device)))
        # Every rank computed the same global values (gathered above), so no further reduction is needed.
        self.log_dict({f"val/{k}": float(v) for k, v in metrics.items() if math.isfinite(float(v))}, sync_dist=False)

    def _noisy_codes(self, images: Tensor, batch_idx: int) -> Tensor | None:
        """Codes of this batch's first images with invisible Gaussian noise (eval.stability_psnr_db), until
        eval.stability_images images of this rank were seen; a generator of its own keeps the global RNG as is."""
        cfg = self.config["eval"]
        room = cfg["stability_images"] - self.tokens.noisy_images
        if room <= 0:
            return None
        g = torch.Generator().manual_seed(self.config["seed"] * 100_003 + batch_idx)
        noisy = noise_at_psnr(images[:room], cfg["stability_psnr_db"], g)
        return self.model.encode(noisy).indices

    def _classification(self, gathered: dict[str, Tensor | None], labels: Tensor) -> dict[str, float]:
        """Zero-shot and linear-probe accuracy on the class label (the headline) and on each attribute task, with
        their mean over tasks (<metric>/mean) when there are attribute tasks."""
        cfg, out = self.config["eval"], {}
        tasks = [("", labels, self.class_names, None)]
        attributes = gathered["attributes"]
        if attributes is not None and self.attribute_tasks:
            tasks += [
                (f"/{n}", attributes[:, j], t.names, t.prompts) for j, (n, t) in enumerate(self.attribute_tasks.items())
            ]
        for metric, enabled in (("linprobe_acc", cfg["linear_probe"]), ("zeroshot_acc", cfg["zero_shot"])):
            zero_shot = metric == "zeroshot_acc"
            if not enabled or (zero_shot and (gathered["image_emb"] is None or not self.class_names)):
                continue
            scores, chances = [], []
            for suffix, y, names, prompts in tasks:
                if zero_shot:
                    text = self._class_embeddings() if prompts is None else self._prompt_embeddings(prompts)
                    value = zero_shot_accuracy(gathered["image_emb"], y, text)
                else:
                    value = self._linear_probe(gathered["codes"], y)
                out[metric + suffix] = value
                scores.append(value)
                chances.append(1.0 / len(names) if names else float("nan"))
                self.chance[f"val/{metric}{suffix}"] = chances[-1]
            if len(tasks) > 1:
                out[f"{metric}/mean"] = sum(scores) / len(scores)
                self.chance[f"val/{metric}/mean"] = sum(chances) / len(chances)
        return out

    def _prompt_embeddings(self, prompts: list[list[str]]) -> Tensor:
        """Per value, the l2-normalised mean text embedding of its prompts -> (values, embed_dim)."""
        per_value = [torch.nn.functional.normalize(self.model.encode_text(p).mean(0), dim=-1) for p in prompts]
        return torch.stack(per_value)

    def _linear_probe(self, feats: Tensor, labels: Tensor) -> float:
        """Fit on even-indexed validation samples, test on odd ones (deterministic split of the val set)."""
        train, test = slice(0, None, 2), slice(1, None, 2)
        return linear_probe_accuracy(feats[train], labels[train], feats[test], labels[test])

    def _class_embeddings(self) -> Tensor:
        """Mean text embedding over prompt templates for each class name -> (K, embed_dim), l2-normalised."""
        return self._prompt_embeddings([[t.format(name) for t in self.prompt_templates] for name in self.class_names])

    def _save_grid(self, images: Tensor, recon: Tensor) -> None:
        from torchvision.utils import save_image

        n = min(self.config["eval"]["grid_images"], images.shape[0])
        if n == 0:
            return
        grid = torch.cat([images[:n], recon[:n].clamp(-1, 1)]).float().cpu() * 0.5 + 0.5
        self.grid_path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, self.grid_path, nrow=n)  # row 1: originals, row 2: reconstructions

    # ---- optimisation ----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        return self.optimizer_and_schedule(int(self.trainer.max_steps))

    def optimizer_and_schedule(self, total_steps: int) -> dict[str, Any]:
        """AdamW over the module's parameter groups and the warmup + cosine schedule for total_steps (what
        configure_optimizers returns to Lightning; public so that benchmarks run the same optimiser)."""
        cfg = self.config["optim"]
        groups = parameter_groups(self.model, cfg, self.lr_mults)
        if self.objective.discriminator is not None:
            disc = [p for p in self.objective.discriminator.parameters() if p.requires_grad]
            groups.append({"params": disc, "weight_decay": 0.0, "lr": cfg["disc_lr"]})
        optimizer = adamw(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]))
        total = max(1, total_steps)
        warmup, floor = cfg["warmup_steps"], cfg["min_lr_ratio"]

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
