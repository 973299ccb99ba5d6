"""The hyper-parameter search on Optuna's ask/tell interface (the logic behind
hydra_plugins/resnet_exp_search): the search space, the study, one sweep, its figure."""
