"""Commands that convert or check model files: `import`, `export`, `merge`, `quantize`, `verify`.

Design choices:
- `import` turns a local Hugging Face folder or a `.gguf` into a `.tinygpt` (`interop`).
- `export` writes a transformers folder, a PEFT adapter or a GGUF file. Adapters given with `--lora`
  are merged into the weights before a full-model export; `--format peft` instead keeps the LAST
  adapter separate and writes it as a PEFT adapter folder (earlier adapters merged into the base,
  written with `--base-out`).
- `merge` folds adapters into the weights and writes a plain `.tinygpt`.
- `quantize --int8` writes weight-only int8 with per-channel scales (`quantize.py`), and with
  `--data` prints the perplexity before and after.
- `verify FILE` checks a .tinygpt, .lora or training state file without loading a model: it
  reads one tensor at a time (memory: the largest tensor), checks the content checksum and
  finiteness, parses the metadata, and compares every tensor's shape and dtype with the config
  (the model's structure described on the meta device, no weights). The same checks run on
  every load; verify only reports them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import check_shapes, parse_model_meta, save_model, split_head
from ..device import DeviceOptions, check_device_name, setup_device
from ..errors import UserError
from ..eval.ppl import load_documents, perplexity
from ..interop.gguf import GGUF_DTYPES, export_gguf
from ..interop.hf import export_hf, export_peft
from ..io import check_writable, verify_file
from ..load import load_model_and_tokenizer
from ..lora import LORA_FORMAT, adapter_info, merge_and_unload
from ..options import Options, at_least, option
from ..quantize import QUANT_INT8, dequantize_model, quantize_model
from ..stages.common import ModelOptions, check_inputs, lora_specs

EXPORT_FORMATS = ("hf", "peft", "gguf")
HF_DTYPES = ("f32", "f16", "bf16")


# ---- import -----------------------------------------------------------------------------------
@dataclass
class ImportOptions(Options):
    command = "import"
    src: str | None = option(None, "Hugging Face model folder (GPT-2, Llama, Qwen2, Qwen3) or .gguf file",
                             positional=True, required=True)
    out: str | None = option(None, "output .tinygpt", required=True)


def import_model(src, out) -> dict:
    """Convert a Hugging Face folder or a .gguf file into a .tinygpt file; returns a summary."""
    src = Path(src)
    if not src.exists():
        raise UserError(f"not found: {src}", None, "pass a Hugging Face model folder or a .gguf file")
    if not (src.is_dir() or src.suffix == ".gguf"):
        raise UserError(f"cannot import {src.name}", str(src), "pass a Hugging Face model folder or a .gguf file")
    model, tok = load_model_and_tokenizer(src)
    save_model(out, model, tok, {"source": str(src)})
    return {"params": model.num_params(), "vocab": model.config.vocab_size, "layers": model.config.n_layer}


def import_command(opts: ImportOptions) -> None:
    check_writable(opts.out)
    info = import_model(opts.src, opts.out)
    print(f"{opts.src} -> {opts.out} ({info['params'] / 1e6:.2f}M parameters, vocab {info['vocab']})")


# ---- export -----------------------------------------------------------------------------------
@dataclass
class ExportOptions(ModelOptions):
    command = "export"
    group = "export"
    format: str | None = option(None, "what to write", choices=EXPORT_FORMATS, required=True)
    out: str | None = option(None, "output folder (hf, peft) or .gguf file", required=True)
    dtype: str | None = option(None, "hf: f32 (default), f16, bf16; gguf: f16 (default), f32, q8_0, q5_1, q5_0, "
                               "q4_1, q4_0",
                               choices=tuple(dict.fromkeys(HF_DTYPES + GGUF_DTYPES)))
    base_out: str | None = option(None, "peft: also write the base model (earlier adapters merged) as an hf folder")

    def check(self) -> None:
        if self.base_out and self.format != "peft":
            raise UserError("--base-out only applies to --format peft")
        if self.format and self.dtype and self.dtype not in (GGUF_DTYPES if self.format == "gguf" else HF_DTYPES):
            allowed = GGUF_DTYPES if self.format == "gguf" else HF_DTYPES
            raise UserError(f"--dtype {self.dtype} is not available for --format {self.format}", None,
                            f"choose one of {', '.join(allowed)}")
        if self.format == "peft" and not self.lora:
            raise UserError("--format peft needs a --lora adapter", None, "pass --lora FILE.lora")
        super().check()


def export_model(src, out, fmt: str, lora=(), dtype: str | None = None, base_out=None,
                 allow_nonfinite: bool = False) -> dict:
    """Export a model (a .tinygpt, an HF folder or a .gguf) with `lora` (path, weight) pairs.
    fmt "hf" / "gguf": adapters merged, full model written. fmt "peft": the last adapter becomes a
    PEFT adapter folder at `out` (earlier adapters merged into the base), and the base is written
    as a transformers folder at `base_out` when given. Returns a summary dict."""
    dtype = dtype or ("f16" if fmt == "gguf" else "f32")
    model, tok = load_model_and_tokenizer(src, lora=list(lora), allow_nonfinite=allow_nonfinite)   # stacked in order
    dequantize_model(model)   # int8 files export their dequantized weights (formats hold floats)
    if fmt == "peft":
        last = list(model._lora_meta)[-1]
        rows = model._lora_meta[last].get("trained_tokens")
        if rows and not base_out:   # loading wrote them into the base: only an exported base has them
            raise UserError(f"the adapter also trained the rows of {', '.join(rows)}, which a PEFT LoRA folder "
                            "does not hold", str(lora[-1][0]),
                            "pass --base-out DIR: the base written there carries them")
        info = export_peft(model, last, out, base_out=base_out)
        if base_out:   # what remains: the base with the earlier adapters (and any tokens they added)
            export_hf(merge_and_unload(model), tok, base_out, dtype)
        return info
    if lora:
        merge_and_unload(model)
    if fmt == "hf":
        return {"family": export_hf(model, tok, out, dtype)}
    return export_gguf(model, tok, out, dtype)


def export_command(opts: ExportOptions) -> None:
    check_inputs(opts)
    check_writable(opts.out, folder=opts.format != "gguf")
    if opts.base_out:
        check_writable(opts.base_out, "--base-out", folder=True)
    info = export_model(opts.model, opts.out, opts.format, lora_specs(opts), opts.dtype, opts.base_out,
                        opts.allow_nonfinite)
    extra = f"; {info['modelfile']}" if "modelfile" in info else ""
    print(f"wrote {opts.out} ({opts.format}, {info['family']}){extra}")


# ---- merge ------------------------------------------------------------------------------------
@dataclass
class MergeOptions(ModelOptions, DeviceOptions):
    command = "merge"
    out: str | None = option(None, "output .tinygpt", required=True)
    device: str = option("cpu", "where to merge: auto, cpu, cuda, cuda:N or mps", check=check_device_name)

    def check(self) -> None:
        if self.out and Path(self.out).suffix != ".tinygpt":
            raise UserError("merge writes a whole model", self.out, "use --out X.tinygpt")
        super().check()


def merge_to_file(base, specs, out, device="cpu", log=print, allow_nonfinite: bool = False) -> dict:
    """Load `base` (a .tinygpt or Hugging Face folder) with the adapters `specs` [(path, weight)],
    fold them into the weights and write a plain `.tinygpt` to `out`. Returns a summary."""
    if not specs:
        raise UserError("nothing to merge", None, "give at least one --lora FILE")
    model, tok = load_model_and_tokenizer(base, lora=specs, device=device, allow_nonfinite=allow_nonfinite)
    n_adapters = len(getattr(model, "_lora_meta", {}))
    merge_and_unload(model)
    model._base_fingerprint = None
    save_model(out, model, tok, {"merged_adapters": json.dumps([[str(p), w] for p, w in specs])})
    log(f"merged {n_adapters} adapter(s) into {base} -> {out}")
    return {"out": str(out), "adapters": n_adapters, "vocab_size": model.config.vocab_size}


def merge_command(opts: MergeOptions) -> None:
    if not opts.lora:
        raise UserError("no adapter to merge", None, "give --lora FILE (repeatable, PATH:WEIGHT)")
    check_inputs(opts)
    check_writable(opts.out)
    merge_to_file(opts.model, lora_specs(opts), opts.out, opts.device, log=print, allow_nonfinite=opts.allow_nonfinite)


# ---- quantize ---------------------------------------------------------------------------------
@dataclass
class QuantizeOptions(ModelOptions, DeviceOptions):
    command = "quantize"
    int8: bool = option(False, "int8 weights with per-output-channel scales (the only scheme)", required=True)
    out: str | None = option(None, "output .tinygpt", required=True)
    data: str | None = option(None, "text file to measure perplexity on, before and after")
    limit: int = option(100, "documents of --data to score", check=at_least(1))


def quantize_file(src, out, data=None, lora=(), limit: int = 100, device: str = "cpu",
                  allow_nonfinite: bool = False) -> dict:
    """Quantize a model (a .tinygpt or HF folder, adapters merged) to an int8 .tinygpt at `out`.
    Returns sizes (file bytes before/after) and, with `data`, perplexity before/after."""
    docs = load_documents(data, limit) if data is not None else None
    model, tok = load_model_and_tokenizer(src, lora=lora, device=device, allow_nonfinite=allow_nonfinite)
    if lora:
        merge_and_unload(model)
    model.float()
    src = Path(src)
    report = {"size_before": os.path.getsize(src) if src.is_file() else weight_bytes(model)}
    if docs:
        report["ppl_before"] = perplexity(model, tok, docs)["ppl"]
    report["layers"] = quantize_model(model)
    if docs:
        report["ppl_after"] = perplexity(model, tok, docs)["ppl"]
    save_model(out, model, tok, {"quantization": QUANT_INT8, "source": str(src),
                                 "quantization_info": json.dumps({"scheme": "weight-only int8, per output channel"})})
    report["size_after"] = os.path.getsize(out)
    return report


def weight_bytes(model) -> int:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers(recurse=True)):
        if id(t) not in seen and not t.is_meta:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


def quantize_command(opts: QuantizeOptions) -> None:
    check_inputs(opts, ("--data", opts.data))
    check_writable(opts.out)
    device, _, _ = setup_device(opts.device)
    r = quantize_file(opts.model, opts.out, opts.data, lora_specs(opts), opts.limit, device, opts.allow_nonfinite)
    print(f"size {r['size_before'] / 2**20:.2f} MiB -> {r['size_after'] / 2**20:.2f} MiB "
          f"({r['size_before'] / r['size_after']:.2f}x smaller, {r['layers']} linear layers int8)")
    if "ppl_before" in r:
        print(f"perplexity {r['ppl_before']:.3f} -> {r['ppl_after']:.3f} "
              f"({100 * (r['ppl_after'] / r['ppl_before'] - 1):+.2f}%) on {opts.data}")


# ---- verify -----------------------------------------------------------------------------------
@dataclass
class VerifyOptions(Options):
    command = "verify"
    file: str | None = option(None, "a .tinygpt, .lora or training state (state.safetensors) file", positional=True,
                              required=True)
    allow_nonfinite: bool = option(False, "report NaN or infinite tensors instead of failing on them")


def verify_model_file(path, allow_nonfinite: bool = False) -> str:
    """Check a file as every loader does (see the module docstring); returns a one-line summary,
    raises a UserError naming the first problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}", None, "check the path")
    info = verify_file(path)
    meta, shapes, n_bytes = info["metadata"], info["shapes"], info["bytes"]
    fmt = meta.get("format")
    if fmt == "tinygpt":
        cfg, _ = parse_model_meta(meta, path)
        backbone, head = split_head(shapes, meta, cfg, path)
        check_shapes(backbone, cfg, path, meta.get("quantization"))
        what = (f"tinygpt model{' with a ' + meta['head'] + ' head' if head else ''}: {cfg.n_layer} layers x "
                f"{cfg.n_embd}, context {cfg.block_size}, vocab {cfg.vocab_size}")
    elif fmt == LORA_FORMAT:
        a = adapter_info(meta, shapes, path)
        what = f"LoRA adapter: rank {a['rank']}, alpha {a['alpha']:g}, {sum(k.endswith('.lora_A') for k in shapes)} layers"
    elif fmt == "tinygpt-train-state":
        try:
            step = json.loads(meta["state"])["round"]
        except (KeyError, TypeError, ValueError):
            raise UserError("the training state's metadata cannot be read", str(path), "the file is damaged") from None
        what = f"training state at step {step}"
    else:
        raise UserError(f"not a tinygpt model, adapter or training state (format {fmt!r})", str(path),
                        "tinygpt verify reads .tinygpt, .lora and state.safetensors files")
    if meta.get("training_status") not in (None, "complete"):
        what += f", saved at step {meta.get('training_step')} of {meta.get('training_steps')} ({meta['training_status']})"
    if info["nonfinite"]:
        bad = info["nonfinite"]
        if not allow_nonfinite:
            raise UserError(f"{len(bad)} tensor(s) hold NaN or infinite values (the first: {bad[0]})", str(path),
                            "the model diverged; --allow-nonfinite reports instead of failing")
        what += f"; {len(bad)} tensor(s) hold NaN or infinite values (the first: {bad[0]})"
    check = "checksum ok" if info["checksum"] else "no checksum (written before checksums existed, or elsewhere)"
    return f"{path}: {what}; {len(shapes)} tensors, {n_bytes / 2**20:.2f} MiB; {check}"


def verify_command(opts: VerifyOptions) -> None:
    print(verify_model_file(opts.file, opts.allow_nonfinite))
