"""Runs nanoGPT's own, unchanged train.py (from the current folder) and scores it as it trains.

    python time_to_loss_nanogpt.py '{"val": ..., "curve": ..., "ctx": ..., "batch": ..., "device": ...,
                                     "max_tokens": ..., "max_s": ...}' train.py [train.py's arguments]

Two hooks, nothing else changed:
- `GPT.train(False)` / `GPT.train(True)`, which nanoGPT's `estimate_loss` calls around its own
  evaluation, pause and resume the training clock (which starts when the first evaluation, at
  iteration 0, ends);
- `torch.save` of a checkpoint (every eval_interval, with always_save_checkpoint=True) is not
  written: the clock pauses, the weights are loaded into a second copy of nanoGPT's model and
  scored by `time_to_loss.score` on the held-out windows, the point is appended to the curve file,
  and the clock resumes. Past `max_s` seconds of training the run ends there.
"""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import time_to_loss as ttl  # noqa: E402

sys.path.insert(0, str(Path.cwd()))
import model as nanogpt_model  # noqa: E402  (nanoGPT's model.py, in the scratch folder)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    sys.argv = sys.argv[2:]                       # train.py sees its own command line
    val = np.fromfile(cfg["val"], dtype=np.uint16).astype(np.int64)
    clock, curve = ttl.Clock(cfg["device"]), ttl.Curve(Path(cfg["curve"]))
    module_train, real_save = torch.nn.Module.train, torch.save
    scorer: dict = {}

    def train(self, mode=True):
        if self is not scorer.get("model"):
            clock.resume() if mode else clock.pause()
        return module_train(self, mode)

    def save(obj, f, *args, **kwargs):
        if not (isinstance(obj, dict) and "model" in obj and "iter_num" in obj):
            return real_save(obj, f, *args, **kwargs)
        seconds = clock.pause()
        if "model" not in scorer:
            scorer["model"] = nanogpt_model.GPT(nanogpt_model.GPTConfig(**obj["model_args"])).to(cfg["device"])
            module_train(scorer["model"], False)
        m = scorer["model"]
        m.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in obj["model"].items()})
        # with targets nanoGPT's forward returns the logits of every position (B, T, V)
        loss = ttl.score(lambda x: m(x, x.contiguous())[0], val, cfg["ctx"], cfg["batch"], cfg["device"],
                         cfg["max_tokens"])
        curve.add(obj["iter_num"], seconds, loss)
        if seconds > cfg["max_s"]:
            raise SystemExit(0)
        clock.resume()

    nanogpt_model.GPT.train = train
    torch.save = save
    runpy.run_path("train.py", run_name="__main__")


if __name__ == "__main__":
    main()
