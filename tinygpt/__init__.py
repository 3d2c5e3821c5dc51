"""tinygpt: the modern LLM recipe at small scale, end to end.

Public API (every name is imported on first use, so `import tinygpt` stays cheap):
    load_model_and_tokenizer(path, lora=[...], device=...)   a .tinygpt file, Hugging Face folder or .gguf
    setup_device(device="auto")                               -> (torch.device, rank, world_size)
    GPT, ModelConfig, Tokenizer, format_instruction
    the training stages, each with its Options dataclass (its fields are the command's flags):
        PretrainStage/PretrainOptions, SFTTrainer/SFTOptions, RewardModelTrainer/RewardOptions,
        DPOTrainer/DPOOptions, ORPOTrainer/ORPOOptions, KTOTrainer/KTOOptions,
        PPOTrainer/PPOOptions, GRPOTrainer/GRPOOptions, DistillTrainer/DistillOptions;
        stage(options, ...).train() -> metrics
    generate_command/GenerateOptions (`tinygpt generate`: data sets written by a model)
    RewardModel, ValueNetwork, RolloutBuffer, compute_dpo_loss
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_model_and_tokenizer": "load", "setup_device": "device", "GPT": "model", "ModelConfig": "config",
    "Tokenizer": "tokenizer", "format_instruction": "data.formats",
    "PretrainStage": "stages.pretrain", "PretrainOptions": "stages.pretrain",
    "SFTTrainer": "stages.sft", "SFTOptions": "stages.sft",
    "RewardModelTrainer": "stages.reward", "RewardOptions": "stages.reward", "RewardModel": "reward_model",
    "DPOTrainer": "stages.preference", "DPOOptions": "stages.preference", "ORPOTrainer": "stages.preference",
    "ORPOOptions": "stages.preference", "KTOTrainer": "stages.preference", "KTOOptions": "stages.preference",
    "compute_dpo_loss": "stages.preference",
    "PPOTrainer": "stages.rl", "PPOOptions": "stages.rl", "GRPOTrainer": "stages.rl", "GRPOOptions": "stages.rl",
    "DistillTrainer": "stages.distill", "DistillOptions": "stages.distill",
    "generate_command": "commands.generate_data", "GenerateOptions": "commands.generate_data",
    "ValueNetwork": "rollout", "RolloutBuffer": "rollout",
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
