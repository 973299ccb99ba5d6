"""resnet-exp's search sweeper: Optuna's ask/tell behind hydra/sweeper=search."""
