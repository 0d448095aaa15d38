"""Two gloo ranks fit the real TokenizerModule under Lightning DDP, each on its own shard of the data (the
DistributedSampler Lightning installs); at the end every rank saves what it holds, so that
tests/test_fit_ddp.py can check that the ranks agree tensor for tensor.

    python tests/ddp_fit_worker.py CONFIG.yaml OUT_DIR [key.path=value ...]

The trainer arguments come from the config (trainer.devices=2 trainer.strategy=ddp), as in `tokzoo fit`,
except that DDP does not broadcast buffers (see main). Lightning re-executes this script for rank 1 with the
same argv. No MLflow, no checkpoint. Writes OUT_DIR/<variant>_rank<r>.pt: {"model": the tokenizer's
state_dict, "quantizer_keys", "first_batch" (sha256 of the first training batch's images), "world_size",
"global_step"}.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

from tokzoo.config import load_variants
from tokzoo.lit.module import TokenizerModule
from tokzoo.resume import safe_name
from tokzoo.runner import build_datamodule, trainer_kwargs


class SaveRankState(L.Callback):
    def __init__(self, path_for_rank):
        self.path_for_rank = path_for_rank
        self.first_batch: str | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_batch is None:
            self.first_batch = hashlib.sha256(batch["image"].detach().cpu().numpy().tobytes()).hexdigest()

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(
            {
                "model": {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()},
                "quantizer_keys": sorted(f"quantizer.{k}" for k in pl_module.model.quantizer.state_dict()),
                "first_batch": self.first_batch,
                "world_size": trainer.world_size,
                "global_step": trainer.global_step,
            },
            self.path_for_rank(trainer.global_rank),
        )


def main(config: str, out: str, overrides: list[str]) -> None:
    out_dir = Path(out)
    _, variants = load_variants(config, overrides)
    for variant in variants:
        L.seed_everything(variant.seed, workers=True, verbose=False)
        kwargs = trainer_kwargs(variant.config)
        kwargs.update(logger=False, enable_checkpointing=False, enable_progress_bar=False)
        if kwargs.get("strategy") == "ddp":
            # DDP's default broadcasts rank 0's buffers before every forward, which would overwrite a rank-local
            # EMA codebook update and hide it; without it, equal buffers mean the quantizer syncs itself.
            kwargs["strategy"] = DDPStrategy(broadcast_buffers=False)
        saver = SaveRankState(lambda rank, v=variant.name: out_dir / f"{safe_name(v)}_rank{rank}.pt")
        trainer = L.Trainer(callbacks=[saver], **kwargs)
        trainer.fit(TokenizerModule(variant.config), datamodule=build_datamodule(variant.config))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
