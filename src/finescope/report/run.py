"""Write `<run>/report/report.md`, a self-contained `report.html` (plots inlined as base64) and `plots/*.png`,
plus the model card `README.md` in the final model folder.

    finescope report runs/default
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path

from .. import storage
from . import card, plots, tables

CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:.4em 0}
code{background:#f5f5f5;padding:0 3px}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.note{color:#555;font-size:13px}"""


def _blocks(data: dict, plot_files: dict[str, bytes]) -> list[tuple]:
    m, run_dir = data["manifest"], data["run_dir"]
    cfg = m.get("config", {})
    b: list[tuple] = [("h1", f"FineScope run `{m.get('name')}`"),
                      ("p", f"Model `{m.get('model')}`; run directory `{run_dir}`; written "
                            f"{time.strftime('%Y-%m-%d %H:%M')}. Variants: "
                            + ", ".join(f"`{n}`" for n in m.get("variants", {}) if not n.startswith("sweep@")) + "."),
                      ("h2", "Results")]
    header, body = tables.results_table(data)
    b.append(("table", header, body))
    ns = sorted({f"{c.label.split(' ')[0]} n={r.n.get(c.key)}" for r in data["rows"] for c in data["columns"]
                 if r.n.get(c.key)})
    b.append(("note", "Rows = variants, columns = metrics (↑ higher is better, ↓ lower is better). In brackets: "
                      "% of the dense model's value for ↑ metrics, the difference to dense for NLL. Questions per "
                      "task: " + ", ".join(ns) + ". Small n means wide error bars (see the plot's whiskers)."))
    if "metrics" in plot_files:
        b.append(("img", "metrics", "metric per variant (dashed: dense)"))
    if "sweep" in plot_files:
        b.append(("img", "sweep", "NLL vs pruning ratio"))
    b.append(("h2", "Variants"))
    b.append(("table", ["Variant", "Label", "What", "Stage folders"],
              [[n, v["label"], v["description"], ", ".join(v["stages"].values())]
               for n, v in m.get("variants", {}).items()]))

    curate_dir = tables.main_folder(data, "curate")
    if curate_dir is not None and (curate_dir / "metrics.json").is_file():
        ev = tables.selection_evidence(curate_dir)
        mm = ev["metrics"]
        b.append(("h2", "Selection evidence"))
        b.append(("p", f"`{curate_dir.relative_to(run_dir)}`: {mm.get('selected')} of {mm.get('pool_records')} pool "
                       f"records selected with seeds `{ev['config'].get('seeds')}` (method `{mm.get('method')}`, "
                       f"selector `{ev['config'].get('selector')}`, layers {mm.get('layers')}). Selected by source: "
                       + card._top(mm.get("selected_sources", {}), 10) + "."))
        for layer, s in (mm.get("sae") or {}).items():
            b.append(("p", f"SAE {layer}: FVU {tables.fmt(s.get('fvu'))}, L0 {tables.fmt(s.get('l0'), 1)}, dead "
                           f"fraction {tables.fmt(s.get('dead_fraction'))}, {s.get('tokens')} training tokens."))
        if "scores" in plot_files:
            b.append(("img", "scores", "selection scores: selected vs rest"))
        if "sae" in plot_files:
            b.append(("img", "sae", "SAE training curves"))
        for layer, lat in ev["latents"].items():
            b.append(("h3", f"Top shared SAE latents ({layer})"))
            b.append(("table", ["latent", "seed mean", "selected mean", "pool mean", "top pool snippets"],
                      [[f["latent"], tables.fmt(f["seed_mean_activation"]), tables.fmt(f["selected_mean_activation"]),
                        tables.fmt(f["pool_mean_activation"]),
                        " ‖ ".join(f"[{s['source']}, {s['activation']:.2f}] {s['text']}" for s in f["snippets"])]
                       for f in lat]))
        b.append(("h3", "Sample of selected records"))
        b.append(("table", ["rank", "source", "score", "nearest seed", "text"],
                  [[r["rank"], r["source"], tables.fmt(r["score"]), r["nearest_seed"], r["text"]]
                   for r in ev["selected"]]))

    prunes = {s["folder"]: tables.prune_summary(run_dir / s["folder"]) for s in data["stages"] if s["stage"] == "prune"}
    prunes = {k: v for k, v in prunes.items() if v}
    if prunes:
        b.append(("h2", "Pruning"))
        b.append(("table", ["folder", "params before → after", "removed", "layers", "heads", "KV heads", "MLP width",
                            "importance", "calibration", "reload verified"],
                  [[k, f"{p['parameters']['before'] / 1e6:.1f}M → {p['parameters']['after'] / 1e6:.1f}M",
                    f"{100 * p['parameters']['ratio']:.1f}%",
                    *[f"{p['shapes_before'][x]}→{p['shapes_after'][x]}" for x in
                      ("layers", "attention_heads", "kv_heads", "mlp_width")],
                    p["importance"], f"{(p.get('calibration') or {}).get('records')} records", str(p["verified"])]
                   for k, p in prunes.items()]))
        if "widths" in plot_files:
            b.append(("img", "widths", "kept widths"))

    recovers = {s["folder"]: tables.recover_summary(run_dir / s["folder"]) for s in data["stages"]
                if s["stage"] == "recover"}
    recovers = {k: v for k, v in recovers.items() if v}
    if recovers:
        b.append(("h2", "Recovery"))
        b.append(("table", ["folder", "mode", "records", "rewrite acceptance", "filter counts", "train ex.", "steps",
                            "held-out loss before → after"],
                  [[k, r["mode"], r["records"], tables.fmt(r["acceptance_rate"]),
                    ", ".join(f"{a} {n}" for a, n in r["filter_counts"].items()), r["train_examples"], r["steps"],
                    f"{tables.fmt(r['eval_loss_first'])} → {tables.fmt(r['eval_loss_last'])}"]
                   for k, r in recovers.items()]))
        if "recovery" in plot_files:
            b.append(("img", "recovery", "recovery loss curves"))

    b.append(("h2", "Timings"))
    header, body = tables.timings_table(data)
    b.append(("table", header, body))
    b.append(("note", f"Seconds are wall time of each stage when the pipeline ran it (a stage shared by several "
                      f"variants runs once). Last invocation: {m.get('last_run_wall_s')} s. Config: "
                      f"`pipeline.yaml` in the run directory."))
    if data.get("card"):
        b.append(("p", f"Model card: `{data['card']}`"))
    return b


def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + blk[1] + "\n")
        elif kind in ("p", "note"):
            out.append(blk[1] + "\n")
        elif kind == "table":
            out.append(tables.markdown_table(blk[1], blk[2]))
        elif kind == "img":
            out.append(f"![{blk[2]}](plots/{blk[1]}.png)\n")
    return "\n".join(out)


def _inline_code(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(blocks: list[tuple], plot_files: dict[str, bytes], title: str) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body>"]
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{_inline_code(blk[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline_code(blk[1])}</p>")
        elif kind == "note":
            out.append(f"<p class='note'>{_inline_code(blk[1])}</p>")
        elif kind == "table":
            out.append(tables.html_table(blk[1], blk[2]))
        elif kind == "img":
            data = base64.b64encode(plot_files[blk[1]]).decode("ascii")
            out.append(f"<figure><img alt='{html.escape(blk[2])}' src='data:image/png;base64,{data}'>"
                       f"<figcaption class='note'>{html.escape(blk[2])}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def final_variant(data: dict) -> str | None:
    """The variant whose model gets the card: FineScope (pruned + TGD) first, else the last one with a model."""
    variants = data["manifest"].get("variants", {})
    for name in ("pruned_tgd", *reversed([n for n in variants if not n.startswith("sweep@")])):
        v = variants.get(name)
        if v and ("recover" in v["stages"] or "prune" in v["stages"]):
            return name
    return None


def write_report(run_dir: str | Path) -> Path:
    """(Re)write the report of a run directory from its files; return the path of report.html."""
    run_dir = Path(run_dir).resolve()
    data = tables.collect(run_dir)
    m = data["manifest"]
    curations = {s["folder"]: run_dir / s["folder"] for s in data["stages"] if s["stage"] == "curate"}
    curate_dir = tables.main_folder(data, "curate")
    figs = {
        "metrics": plots.metrics_per_variant(data),
        "sweep": plots.ratio_sweep(data["sweep"]),
        "scores": plots.score_histograms(curations),
        "sae": plots.sae_curves(tables.selection_evidence(curate_dir)["metrics"]) if curate_dir else None,
        "widths": plots.kept_widths({s["folder"]: tables.prune_summary(run_dir / s["folder"])
                                     for s in data["stages"] if s["stage"] == "prune"}),
        "recovery": plots.recovery_curves({s["folder"]: tables.recover_summary(run_dir / s["folder"])
                                           for s in data["stages"] if s["stage"] == "recover"}),
    }
    figs = {k: v for k, v in figs.items() if v}
    out = run_dir / "report"
    for name, png in figs.items():
        storage.write_atomic(out / "plots" / f"{name}.png", png)
    variant = final_variant(data)
    if variant is not None:
        stages = m["variants"][variant]["stages"]
        model_dir = run_dir / stages.get("recover", stages.get("prune")) / "model"
        if model_dir.is_dir():
            storage.write_atomic(model_dir / "README.md", card.model_card(data, variant, model_dir))
            data["card"] = str(model_dir / "README.md")
    blocks = _blocks(data, figs)
    storage.write_atomic(out / "report.md", render_markdown(blocks))
    html_path = storage.write_atomic(out / "report.html", render_html(blocks, figs, f"FineScope run {m.get('name')}"))
    return html_path
