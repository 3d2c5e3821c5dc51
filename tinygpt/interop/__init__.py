"""Interoperability: Hugging Face transformers folders and PEFT adapters (`hf`), GGUF for
llama.cpp and Ollama (`gguf`).

Design choices:
- Our parameter names ARE Hugging Face Llama's, so Llama, Qwen2 and Qwen3 are name-for-name
  copies; only GPT-2 needs a real map (Conv1D layout, fused c_attn). See `hf.py` and `gguf.py`.
- Which Hugging Face class a model becomes is decided by its shape alone (`hf.family_of`); a shape
  no class can express (ReLU^2 MLP, RoPE with LayerNorm, ...) is refused with the reason instead of
  being exported as something that computes a different function.
- Output folders are built in a temporary sibling folder and renamed into place at the end
  (`io.atomic_dir`), so an interrupted export never leaves half a folder behind. Nothing is
  downloaded: every input is a local file or folder.
- The commands (`tinygpt import`, `tinygpt export`) live in `commands/files.py`.
"""
