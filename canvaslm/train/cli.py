"""`canvaslm train --config FILE.yaml [--resume]` and `canvaslm export CHECKPOINT OUT [--dtype | --adapter]`.

Under torchrun every process runs the same command; the trainer reads RANK / WORLD_SIZE itself.
"""

from __future__ import annotations

import json
import logging
import sys


def _train(args) -> int:
    from .trainer import Trainer, TrainConfig

    logging.getLogger("canvaslm").setLevel(logging.INFO)
    overrides = {"max_steps": args.max_steps, "out_dir": args.out_dir}
    config = TrainConfig.from_yaml(args.config, **overrides)
    trainer = Trainer(config, resume=args.resume)
    history = trainer.train()
    if trainer.dist.rank == 0 and history:
        last = history[-1]
        print(json.dumps({"step": last["step"], "loss": last["loss"], "out_dir": str(trainer.out_dir),
                          "final": str(trainer.out_dir / "final"),
                          **({"eval_loss": last["eval_loss"]} if "eval_loss" in last else {})}))
    return 0


def _export(args) -> int:
    from .checkpointing import export_adapter, export_checkpoint

    if args.adapter:
        if args.dtype is not None:
            raise ValueError("export: --dtype does not apply to --adapter (the adapter is written as trained)")
        out = export_adapter(args.checkpoint, args.out)
    else:
        out = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype)
    print(out)
    return 0


def add_parser(subparsers):
    t = subparsers.add_parser("train", help="fine-tune or train a DiffusionGemma model from a YAML config",
                              description="Train with the block-diffusion objective (see docs/training.md). "
                                          "Data parallel: torchrun --nproc_per_node N -m canvaslm.train.cli ...")
    t.add_argument("--config", required=True, help="YAML file with TrainConfig keys")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    t.add_argument("--max-steps", type=int, default=None, help="override max_steps")
    t.add_argument("--out-dir", default=None, help="override out_dir")
    t.set_defaults(func=_train)
    e = subparsers.add_parser("export", help="export a training checkpoint to a clean HF checkpoint dir")
    e.add_argument("checkpoint", help="a checkpoint-<step> dir or a training out_dir (uses its latest)")
    e.add_argument("out", help="output directory")
    e.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: as trained)")
    e.add_argument("--adapter", action="store_true",
                   help="write only a LoRA run's adapters, as a PEFT adapter dir (serve it with --lora-modules)")
    e.set_defaults(func=_export)


def main(argv=None) -> int:
    """Entry point for `python -m canvaslm.train.cli train ...` (handy under torchrun)."""
    from ..cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
