"""tinygpt: the modern LLM recipe at small scale, end to end.

Public API:
    load_model_and_tokenizer(path, lora=[...], device=...)   a .tinygpt file or a Hugging Face folder
    setup_device(device="auto")                               -> (torch.device, rank, world_size)
    GPT, ModelConfig, Tokenizer
    SFTTrainer, DPOTrainer, ORPOTrainer, KTOTrainer, RewardModelTrainer, PPOTrainer, GRPOTrainer
Every name past the first two is imported on first use, so `import tinygpt` stays cheap.
"""
from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def load_model_and_tokenizer(path, lora=(), device="cpu", dtype=None):
    """Load a model and its tokenizer from a `.tinygpt` file or a local Hugging Face folder.

    lora: adapter paths, or (path, weight) pairs, stacked on the base in order."""
    p = Path(path)
    if p.is_dir():
        from .interop.hf import load_hf
        model, tok = load_hf(p)
        model.to(device=device, dtype=dtype) if dtype else model.to(device)
    elif p.suffix == ".gguf":
        from .interop.gguf import load_gguf
        model, tok = load_gguf(p)
        model.to(device=device, dtype=dtype) if dtype else model.to(device)
    else:
        from .checkpoint import load_model
        model, tok, _ = load_model(p, device=device, dtype=dtype)
    if lora:
        from .lora import load_adapters
        specs = [(x, 1.0) if isinstance(x, (str, Path)) else tuple(x) for x in lora]
        load_adapters(model, specs, tokenizer=tok)
        model.to(device)
    model.eval()
    return model, tok


def setup_device(device: str = "auto"):
    from .train.engine import setup_device as _setup
    return _setup(device)


_LAZY = {"SFTTrainer": "sft", "DPOTrainer": "dpo", "ORPOTrainer": "dpo", "KTOTrainer": "dpo",
         "RewardModelTrainer": "reward", "PPOTrainer": "rlhf", "GRPOTrainer": "rlhf"}
__all__ = ["load_model_and_tokenizer", "setup_device", "GPT", "ModelConfig", "Tokenizer", *_LAZY]


def __getattr__(name):  # lazy: `import tinygpt` stays cheap and torch-free until used
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name == "GPT":
        from .model import GPT
        return GPT
    if name == "ModelConfig":
        from .config import ModelConfig
        return ModelConfig
    if name == "Tokenizer":
        from .tokenizer import Tokenizer
        return Tokenizer
    raise AttributeError(name)
