"""What the EMA of weights (tokzoo/lit/ema.py, config `ema`) costs per training step, and what its raw-weights
validation pass costs per validation.

    python benchmarks/ema.py                                  # tokzoo's default config on CPU, decay 0.9999
    python benchmarks/ema.py --steps 40 --json bench-ema.json model.quantizer.codebook_size=1024

The training step is benchmarks/train_step.py's (the module's own loss_terms, backward, AdamW and schedule), on the
module built from the default config (or `--config`) with dot-list overrides. Timed steps alternate: even steps are
followed by the real callback's update (`WeightEMA.on_train_batch_end`, what Lightning calls after the optimizer
step), odd ones are not, so that background load hits both alike. Reported: the median step without EMA, the median
step plus update with it, the median update alone and its ratio to the step without EMA (the target: at most 5 %).
Then, once: the swap of the EMA into the weights and back that every validation does, and one validation pass
through the module's own hooks (`train_step.validation_pass`), which is what `ema.raw_metrics` adds per validation,
as a share of a `trainer.max_steps` run that validates once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from _machine import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from train_step import StageTimer, build_optimizer, cycle, resolve_config, to_device, train_step, validation_pass

from tokzoo.lit.ema import WeightEMA
from tokzoo.lit.module import TokenizerModule
from tokzoo.runner import build_datamodule


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="run config or ablation file (default: tokzoo's default config)")
    p.add_argument("--variant", default=None, help="variant of an ablation file (default: the first)")
    p.add_argument("--steps", type=int, default=30, help="timed training steps (half of them with the EMA update)")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    p.add_argument("--decay", type=float, default=0.9999, help="ema.decay")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("overrides", nargs="*", help="dot-list config overrides, e.g. data.batch_size=32")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*self.log.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    spec = SimpleNamespace(config=args.config, variant=args.variant, preset="default", batch_size=None)
    spec.overrides = [f"ema.decay={args.decay}", *args.overrides]
    with tempfile.TemporaryDirectory(prefix="tokzoo-bench-ema-") as tmp:
        name, config = resolve_config(spec, Path(tmp))
        torch.manual_seed(config["seed"])
        datamodule = build_datamodule(config)
        datamodule.setup("fit")
        module = TokenizerModule(config)
        module.class_names = datamodule.class_names or None
        module.train()
        opt, sched = build_optimizer(module)
        timer = StageTimer(torch.device("cpu"))
        ema = WeightEMA(args.decay)
        trainer = SimpleNamespace(global_step=0, sanity_checking=False)  # what the callback reads
        ema.on_train_start(trainer, module)
        batches = cycle(datamodule.train_dataloader())

        plain, with_ema, update = [], [], []
        for i in range(args.warmup + args.steps):
            batch = to_device(next(batches), torch.device("cpu"))
            step_s = train_step(module, opt, sched, batch, i, timer)["step"]
            if i % 2 == 0:
                trainer.global_step += 1
                start = time.perf_counter()
                ema.on_train_batch_end(trainer, module, None, batch, i)
                update_s = time.perf_counter() - start
            if i < args.warmup:
                continue
            if i % 2 == 0:
                update.append(1e3 * update_s)
                with_ema.append(1e3 * (step_s + update_s))
            else:
                plain.append(1e3 * step_s)

        start = time.perf_counter()
        ema._swap_in()
        ema._swap_out()
        swap_ms = 1e3 * (time.perf_counter() - start)
        val = validation_pass(module, datamodule.val_dataloader(), None, torch.device("cpu"))

    step_ms, update_ms = statistics.median(plain), statistics.median(update)
    run_s = config["trainer"]["max_steps"] * step_ms / 1e3
    res = {
        "config": name,
        "decay": args.decay,
        "batch_size": config["data"]["batch_size"],
        "tracked_tensors": len(ema.ema),
        "tracked_millions": sum(e.numel() for e in ema.ema) / 1e6,
        "params_millions": sum(p.numel() for p in module.parameters()) / 1e6,
        "step_ms_without_ema": step_ms,
        "step_ms_with_ema": statistics.median(with_ema),
        "ema_update_ms": update_ms,
        "ema_over_step": update_ms / step_ms,
        "swap_in_and_out_ms": swap_ms,
        "validation_pass_s": val["seconds"],
        "validation_images": val["images"],
        "raw_pass_share_of_run": val["seconds"] / (run_s + 2 * val["seconds"]),
        "max_steps": config["trainer"]["max_steps"],
        "steps_each": [len(plain), len(with_ema)],
        "machine": {"device": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "load_before": load_before, "load_after": os.getloadavg()},
    }  # fmt: skip
    print(
        f"EMA of weights | {name} | batch {res['batch_size']} | {res['tracked_millions']:.2f} M values in "
        f"{res['tracked_tensors']} tensors averaged (of {res['params_millions']:.2f} M module parameters)\n"
        f"step without EMA {step_ms:.1f} ms | with EMA {res['step_ms_with_ema']:.1f} ms (medians of "
        f"{len(plain)} / {len(with_ema)} steps) | EMA update alone {update_ms:.2f} ms = "
        f"{100 * res['ema_over_step']:.2f} % of a step (target <= 5 %)\n"
        f"validation: swap in + out {swap_ms:.1f} ms; one validation pass {val['seconds']:.2f} s, which "
        f"ema.raw_metrics adds per validation ({100 * res['raw_pass_share_of_run']:.1f} % of a "
        f"{res['max_steps']}-step run validating once)\n"
        f"{res['machine']['device']} | {res['machine']['threads']} thread(s) | torch {torch.__version__} | load "
        f"average before / after: {load_before[0]:.2f} / {res['machine']['load_after'][0]:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
