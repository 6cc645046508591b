"""Run under torchrun by test_ddp.py: one gradient computation and two optimizer steps of a config; rank 0
saves the gradients of step 0 and the loss history (argv: config.yaml out.pt)."""

import sys

import torch

from canvaslm.train.trainer import TrainConfig, Trainer

if __name__ == "__main__":
    trainer = Trainer(TrainConfig.from_yaml(sys.argv[1]))
    stats = trainer.compute_gradients(0)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.optimizer.zero_grad(set_to_none=True)
    history = trainer.train()
    if trainer.dist.rank == 0:
        torch.save({"grads": grads, "stats": stats, "history": history, "world": trainer.dist.world}, sys.argv[2])
