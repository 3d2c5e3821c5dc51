"""The training stages, each a `train.stage.Stage` with its Options: pretrain, sft, reward,
preference (DPO family, ORPO, KTO) and rl (PPO, GRPO). Their shared set-up is in `common`."""
