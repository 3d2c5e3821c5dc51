"""The run report: `report.md` and a self-contained `report.html` in a run folder.

Design choices:
- Inputs are only files the stages already write: the pipeline state (`pipeline.json`: order,
  commands, times, hardware), each artifact's `<stem>.run/metrics.jsonl`, and each eval stage's
  results JSON. A folder without a pipeline state still gets a report: its `*.run/metrics.jsonl`
  folders and results files are found by scanning. `tinygpt report RUN_DIR` rebuilds it any time.
- Plots (matplotlib, Agg backend, no display needed): one figure per training stage, one panel per
  group of numeric metrics against the step. Keys containing "loss" share a panel (loss, val_loss,
  policy_loss), as do those containing "accuracy", "reward", "kl", "time", ... (checked in that
  order, so DPO's `rewards/accuracy`, a fraction, is not drawn on the axis of the reward margins);
  other keys group by their prefix before "/". Bookkeeping keys (step, token counters) and
  constant series are not plotted. The HTML embeds the PNGs as base64, so the one file can be
  mailed or opened offline; the markdown links the same PNGs on disk.
- The eval table has one row per evaluated model (its label: base, SFT, DPO, ...) and one column
  per task metric; the best value of each column is marked (bold in md/html, `*` in the terminal).
  Lower is better for perplexity, bits-per-byte, NLL and losses; higher for everything else.
  Counts (n, seconds) are not metrics and are left out.
- The stages table (and the terminal summary after the eval table) gives each stage's steps, tokens,
  median tokens/s (as 12.3k), final training loss and last logged headline metrics: a reward
  model's held-out pairwise accuracy, validation loss, mean RL reward. Noisy per-step series (loss,
  tokens/s) are drawn faintly with a centred moving average over them; sparse ones (validation) as
  points; smooth ones (the learning rate) as they are.
- The eval table is also drawn as grouped bars; the texts stages produced (a `sample` stage's
  output, the last RL iteration's completions) are shown under Samples.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")                  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from .errors import UserError
from .io import atomic_write_bytes, atomic_write_text, check_writable
from .options import Options, option
from .train.engine import run_dir_for

STATE_FILE = "pipeline.json"        # written by `tinygpt pipeline`
LOWER_IS_BETTER = ("ppl", "bpb", "nll", "loss")
NOT_METRICS = {"n", "seconds", "tokens", "bytes", "n_instructions", "truncated"}
BOOKKEEPING = {"step", "iteration", "epoch", "tokens_seen", "tokens", "skipped", "updates", "early_stop"}
# substring -> panel: keys containing it share one panel (checked in this order)
PANELS = ("loss", "accuracy", "reward", "kl", "time", "logps", "entropy")   # DPO rewards/accuracy is 0..1
# last logged values shown per stage (stages table, terminal summary): key -> label
HEADLINE = {"val_accuracy": "held-out accuracy", "val_loss": "val loss", "reward_mean": "reward"}


# ---- gathering --------------------------------------------------------------------------------
def read_metrics(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash; the rest is still worth plotting
    return rows


def read_state(run: Path) -> dict:
    """The pipeline's state file of a run folder (empty when there is none)."""
    f = Path(run) / STATE_FILE
    if not f.exists():
        return {"stages": {}}
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError("the pipeline state file is damaged", str(f), "delete it to start the run again") from None


def collect(run: Path) -> dict:
    """{stages: [{name, cmd, status, seconds, hardware, out, metrics: [...]}], evals: [results]}."""
    run = Path(run)
    state = read_state(run)
    stages = []
    if state["stages"]:
        for name in state.get("order") or list(state["stages"]):
            rec = state["stages"].get(name)
            if rec:
                stages.append({"name": name, **rec})
    else:  # a folder of runs made by hand: find what there is
        for d in sorted(run.glob("*.run"), key=lambda p: p.stat().st_mtime):
            stages.append({"name": d.name[:-4], "cmd": "?", "status": "done", "out": str(d.with_suffix(""))})
        for f in sorted(run.glob("*.json"), key=lambda p: p.stat().st_mtime):
            stages.append({"name": f.stem, "cmd": "eval", "status": "done", "out": str(f)})
    evals = []
    for s in stages:
        out = Path(s.get("out", ""))
        s["metrics"] = read_metrics(run_dir_for(out) / "metrics.jsonl") if s.get("out") else []
        if s.get("cmd") == "eval" and out.is_file():
            try:
                res = json.loads(out.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                continue
            if isinstance(res, dict) and "tasks" in res:
                evals.append(res)
    return {"name": state.get("name", run.name), "hardware": state.get("hardware", ""),
            "compare": state.get("compare", []), "stages": stages, "evals": evals}


# ---- the eval table ---------------------------------------------------------------------------
def eval_table(evals: list[dict]) -> tuple[list[str], list[str], list[list], list[set]]:
    """(row labels, column names 'task/metric', values (None where missing), best row index set
    per column)."""
    cols: list[str] = []
    for res in evals:
        for t, m in res["tasks"].items():
            for k, v in m.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_METRICS \
                        and not k.endswith("_stderr"):
                    if f"{t}/{k}" not in cols:
                        cols.append(f"{t}/{k}")
    labels = [str(r.get("label") or Path(r["model"]["path"]).stem) for r in evals]
    values = [[r["tasks"].get(c.split("/", 1)[0], {}).get(c.split("/", 1)[1]) for c in cols] for r in evals]
    best = []
    for j, c in enumerate(cols):
        col = [(v[j], i) for i, v in enumerate(values) if isinstance(v[j], (int, float)) and math.isfinite(v[j])]
        if not col:
            best.append(set())
            continue
        lower = any(c.split("/", 1)[1].startswith(p) for p in LOWER_IS_BETTER)
        target = min(col)[0] if lower else max(col)[0]
        marked = {i for v, i in col if v == target}
        best.append(marked if len(col) > 1 and len(marked) < len(col) else set())   # all equal: no best
    return labels, cols, values, best


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def table_text(evals: list[dict]) -> str:
    """The eval table for the terminal; the best value of each column carries a '*'."""
    labels, cols, values, best = eval_table(evals)
    if not cols:
        return "(no evaluation results)"
    cells = [["model"] + cols] + [[lab] + [_fmt(v) + ("*" if i in best[j] else "") for j, v in enumerate(row)]
                                  for i, (lab, row) in enumerate(zip(labels, values))]
    widths = [max(len(r[j]) for r in cells) for j in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _eval_rows(evals, bold_md: bool):
    labels, cols, values, best = eval_table(evals)
    rows = []
    for i, (lab, row) in enumerate(zip(labels, values)):
        cells = [html.escape(lab) if not bold_md else lab]
        for j, v in enumerate(row):
            s = _fmt(v)
            cells.append((f"**{s}**" if bold_md else f"<b>{s}</b>") if i in best[j] else s)
        rows.append(cells)
    return ["model"] + cols, rows


def human(n: float) -> str:
    """12_345 -> '12.3k', 1_500_000 -> '1.5M' (readable token counts and rates)."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def _stage_rows(stages) -> tuple[list[str], list[list[str]]]:
    rows = []
    for s in stages:
        metrics = s["metrics"]
        m = metrics[-1] if metrics else {}
        rates = sorted(r["tokens_per_s"] for r in metrics if isinstance(r.get("tokens_per_s"), (int, float)))
        loss = m.get("loss")
        rows.append([s["name"], s.get("cmd", ""), s.get("status", ""),
                     f"{s['seconds']:.1f}" if isinstance(s.get("seconds"), (int, float)) else "-",
                     str(m.get("step", "-")), human(m["tokens_seen"]) if m.get("tokens_seen") else "-",
                     human(rates[len(rates) // 2]) if rates else "-",
                     f"{loss:.4f}" if isinstance(loss, (int, float)) else "-", _headline_text(s) or "-",
                     s.get("hardware", "-")])
    return ["stage", "command", "status", "seconds", "steps", "tokens seen", "tokens/s (median)", "final loss",
            "result", "hardware"], rows


def headline(stage: dict) -> dict:
    """The last logged value of each HEADLINE metric of a stage (validation runs only on some steps)."""
    out = {}
    for key in HEADLINE:
        v = next((r[key] for r in reversed(stage.get("metrics") or []) if isinstance(r.get(key), (int, float))), None)
        if v is not None:
            out[key] = v
    return out


def _headline_text(stage: dict) -> str:
    return ", ".join(f"{HEADLINE[k]} {v:.4f}" for k, v in headline(stage).items())


def stage_summary(stages: list[dict]) -> str:
    """'stage results' lines for the terminal: each stage with a headline metric."""
    lines = [f"  {s['name']}: {_headline_text(s)}" for s in stages if headline(s)]
    return "\n".join(["stage results:"] + lines) if lines else ""


# ---- plots ------------------------------------------------------------------------------------
def metric_groups(rows: list[dict]) -> dict[str, list[str]]:
    """Panel name -> metric keys. Constant series (a fixed lr, a fixed coefficient) are left out."""
    values: dict[str, set] = {}
    for r in rows:
        for k, v in r.items():
            if k not in BOOKKEEPING and isinstance(v, (int, float)) and not isinstance(v, bool):
                values.setdefault(k, set()).add(v)
    groups: dict[str, list[str]] = {}
    for k, vs in values.items():
        if len(vs) < 2 and len(rows) > 1:
            continue
        g = next((p for p in PANELS if p in k), k.split("/", 1)[0])
        groups.setdefault(g, []).append(k)
    return groups


def smooth(ys: list[float], window: int | None = None) -> list[float]:
    """Centred moving average over `window` points (default: a 20th of the series, at least 5),
    narrowing at the ends, so the curve does not lag behind a fast early drop as an EMA would."""
    n = len(ys)
    half = max(1, (window or max(5, n // 20)) // 2)
    csum = [0.0]
    for y in ys:
        csum.append(csum[-1] + y)
    return [(csum[min(n, i + half + 1)] - csum[max(0, i - half)]) / (min(n, i + half + 1) - max(0, i - half))
            for i in range(n)]


def noisy(ys: list[float]) -> bool:
    """Whether a series jumps around (losses, rates) rather than moving smoothly (a schedule)."""
    span = max(ys) - min(ys)
    steps = sorted(abs(b - a) for a, b in zip(ys, ys[1:]))
    return span > 0 and bool(steps) and steps[len(steps) // 2] > 0.01 * span


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def plot_evals(evals: list[dict], most: int = 8) -> bytes | None:
    """Grouped bars of the evaluation table: one group per metric (at most `most`), a bar per model."""
    labels, cols, values, _ = eval_table(evals)
    cols = cols[:most]
    if not cols or len(labels) < 1:
        return None
    fig, ax = plt.subplots(figsize=(min(12, 1.4 + 1.1 * len(cols) * max(1, len(labels)) / 2), 3.2))
    width = 0.8 / len(labels)
    for i, (lab, row) in enumerate(zip(labels, values)):
        ys = [v if isinstance(v, (int, float)) else 0.0 for v in row[:len(cols)]]
        ax.bar([j + i * width for j in range(len(cols))], ys, width, label=lab)
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(cols))])
    ax.set_xticklabels(cols, rotation=20, ha="right", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_stage(stage: dict) -> bytes | None:
    """A PNG of the stage's metrics (one panel per group), or None when it logged nothing."""
    rows = stage["metrics"]
    groups = metric_groups(rows)
    if not groups:
        return None
    n = len(groups)
    ncols = min(3, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.8 * nrows), squeeze=False)
    for ax, (g, keys) in zip(axes.flat, groups.items()):
        for k in keys:
            pts = [(r.get("step", i + 1), r[k]) for i, r in enumerate(rows)
                   if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
            if len(pts) >= 30 and noisy([y for _, y in pts]):   # faint raw values, a smoothed line over them
                line, = ax.plot(*zip(*pts), alpha=0.25, linewidth=0.8)
                ax.plot([x for x, _ in pts], smooth([y for _, y in pts]), color=line.get_color(), label=k)
            elif pts:                 # smooth series as they are; sparse ones (validation) point by point
                ax.plot(*zip(*pts), label=k, marker="o" if len(pts) < 30 else None, markersize=3)
        ax.set_title(g, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{stage['name']} ({stage.get('cmd', '')})", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return _png(fig)


def stage_samples(stage: dict, most: int = 4) -> list[str]:
    """Texts a stage produced: what a `sample` stage printed, the last iteration's RL completions."""
    out = Path(stage.get("out", "") or "")
    if stage.get("cmd") == "sample" and out.is_file():
        return [out.read_text(encoding="utf-8").strip()]
    rows = read_metrics(run_dir_for(out) / "samples.jsonl") if stage.get("out") else []
    if not rows:
        return []
    last = [r for r in rows if r.get("step") == rows[-1].get("step")][:most]
    return [f"{r.get('prompt', '')}{r.get('completion', '')}   [reward {r.get('reward', float('nan')):.3f}]"
            for r in last]


# ---- writing ----------------------------------------------------------------------------------
_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
        "pre{background:#f6f6f6;padding:.6em;white-space:pre-wrap}")


def _figure(run: Path, name: str, png: bytes | None, md: list, ht: list, heading: bool = False) -> None:
    """Write report/<name>.png and reference it from the markdown; embed it in the HTML."""
    if png is None:
        return
    rel = f"report/{name}.png"
    atomic_write_bytes(run / rel, png)
    md += ([f"### {name}", ""] if heading else []) + [f"![{name}]({rel})", ""]
    ht.append((f"<h3>{html.escape(name)}</h3>" if heading else "") +
              f"<img alt='{html.escape(name)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")


def build_report(run) -> dict:
    """Write report.md, report.html and the plots (report/*.png) into the run folder.
    Returns {"md", "html", "table"} (paths and the terminal summary: the eval table, then the
    stages' headline results such as a reward model's held-out accuracy)."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run folder not found: {run}", None, "pass the folder given to 'tinygpt pipeline --out'")
    check_writable(run / "report.md", "the run folder")
    info = collect(run)
    shead, srows = _stage_rows(info["stages"])
    md = [f"# Run report: {info['name']}", "", f"Hardware: {info['hardware'] or 'unknown'}", "",
          "## Evaluation", ""]
    ht = [f"<h1>Run report: {html.escape(info['name'])}</h1>",
          f"<p>Hardware: {html.escape(info['hardware'] or 'unknown')}</p>", "<h2>Evaluation</h2>"]
    if info["evals"]:
        head, rows = _eval_rows(info["evals"], bold_md=True)
        md += [_md_table(head, rows), "", "Best value per column in bold.", ""]
        head, rows = _eval_rows(info["evals"], bold_md=False)
        ht += [_html_table(head, rows), "<p>Best value per column in bold.</p>"]
        _figure(run, "evaluation", plot_evals(info["evals"]), md, ht)
    else:
        md += ["(no evaluation results)", ""]
        ht.append("<p>(no evaluation results)</p>")
    md += ["## Stages", "", _md_table(shead, srows), "", "## Training curves", ""]
    ht += ["<h2>Stages</h2>", _html_table(shead, [[html.escape(c) for c in r] for r in srows]),
           "<h2>Training curves</h2>"]
    for s in info["stages"]:
        _figure(run, s["name"], plot_stage(s), md, ht, heading=True)
    samples = [(s["name"], stage_samples(s)) for s in info["stages"]]
    if any(texts for _, texts in samples):
        md += ["## Samples", ""]
        ht.append("<h2>Samples</h2>")
        for name, texts in samples:
            if texts:
                md += [f"### {name}", ""] + [f"```\n{t}\n```" for t in texts] + [""]
                ht += [f"<h3>{html.escape(name)}</h3>"] + [f"<pre>{html.escape(t)}</pre>" for t in texts]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(info['name'])}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(ht)}</body></html>\n")
    atomic_write_text(run / "report.md", "\n".join(md) + "\n")
    atomic_write_text(run / "report.html", page)
    summary = stage_summary(info["stages"])
    return {"md": run / "report.md", "html": run / "report.html",
            "table": table_text(info["evals"]) + (f"\n\n{summary}" if summary else ""),
            "evals": info["evals"], "compare": info["compare"]}


def compare_line(evals: list[dict], labels: list[str]) -> str | None:
    """'synth/accuracy: SFT 0.41 -> GRPO 0.55' for the first metric both labelled rows have."""
    by = {str(r.get("label")): r for r in evals}
    if len(labels) < 2 or not all(lab in by for lab in labels):
        return None
    rows, cols, values, _ = eval_table([by[lab] for lab in labels])
    parts = []
    for j, c in enumerate(cols):
        if all(isinstance(v[j], (int, float)) for v in values):
            parts.append(f"{c}: " + " -> ".join(f"{lab} {_fmt(v[j])}" for lab, v in zip(rows, values)))
    return "; ".join(parts[:3]) or None


@dataclass
class ReportOptions(Options):
    command = "report"
    run: str | None = option(None, "run folder (from 'tinygpt pipeline')", positional=True, required=True)


def report_command(opts: ReportOptions) -> None:
    rep = build_report(opts.run)
    print(rep["table"])
    print(f"report: {rep['html'].resolve()}")
