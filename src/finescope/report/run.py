"""Write `<run>/report/report.md`, a self-contained `report.html` (plots inlined as base64) and `plots/*.png`,
plus the model card `README.md` in the final model folder.

    finescope report runs/default
    finescope report runs/default --frontier benchmarks/results/frontier.json   # also draw the size/quality frontier

The report opens with the answer (answer.py): the compact model to take, its folder, size and domain / off-domain
quality against dense. A frontier file (frontier.py; `<run>/frontier.json` when no --frontier is given) adds the
size/quality frontier plot and one sentence per ratio.
"""

from __future__ import annotations

import base64
import html
import re
import time
from pathlib import Path

from .. import storage
from . import answer, card, examples, frontier, plots, tables

CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:.4em 0}
code{background:#f5f5f5;padding:0 3px}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.note{color:#555;font-size:13px}pre{background:#f7f7f7;padding:.5em;white-space:pre-wrap;font-size:13px}"""


def _blocks(data: dict, plot_files: dict[str, bytes]) -> list[tuple]:
    """The report as a list of blocks (heading, paragraph, note, table, image, preformatted text), rendered to
    Markdown and HTML."""
    return [
        *_header_blocks(data),
        *answer.blocks(data),
        *_results_blocks(data, plot_files),
        *examples.blocks(data),
        *_frontier_blocks(data, plot_files),
        *_variants_blocks(data),
        *_selection_blocks(data, plot_files),
        *_pruning_blocks(data, plot_files),
        *_recovery_blocks(data, plot_files),
        *_timings_blocks(data),
    ]


def _header_blocks(data: dict) -> list[tuple]:
    m = data["manifest"]
    return [
        ("h1", f"FineScope run `{m.name}`"),
        (
            "p",
            f"Model `{m.model}`; run directory `{data['run_dir']}`; written {time.strftime('%Y-%m-%d %H:%M')}. "
            "Variants: " + ", ".join(f"`{n}`" for n in m.variants if not n.startswith("sweep@")) + ".",
        ),
    ]


def _results_blocks(data: dict, plot_files: dict[str, bytes]) -> list[tuple]:
    header, body = tables.results_table(data)
    ns = sorted(
        {f"{c.label.split(' ')[0]} n={r.n.get(c.key)}" for r in data["rows"] for c in data["columns"] if r.n.get(c.key)}
    )
    summary = tables.summary_note(data)
    b: list[tuple] = [
        ("h2", "Results"),
        ("table", header, body),
        *([("note", summary)] if summary else []),
        (
            "note",
            "Rows = variants, columns = metrics (↑ higher is better, ↓ lower is better). In "
            "brackets: % of the dense model's value for ↑ metrics (none where the dense value is at chance), "
            "the difference to dense for ↓ metrics (NLL; the shares of looping and cut-off replies). "
            "Questions per task: " + ", ".join(ns) + ". Small n means wide error bars (see the "
            "plot's whiskers).",
        ),
    ]
    if "metrics" in plot_files:
        b.append(("img", "metrics", "metric per variant (dashed: dense)"))
    if "sweep" in plot_files:
        b.append(("img", "sweep", "NLL vs pruning ratio"))
    return b


def _frontier_blocks(data: dict, plot_files: dict[str, bytes]) -> list[tuple]:
    f: frontier.Frontier | None = data.get("frontier")
    if f is None:
        return []
    what = "pruned with compensation, no recovery" if f.recovery == "none" else f"pruned, then {f.recovery}"
    if f.recovered_label:
        what += f"; and the same models after {f.recovered_label}"
    tput = f" Measuring machine: {f.throughput:,.0f} tok/s plain forward." if f.throughput else ""
    b: list[tuple] = [
        ("h2", "Size / quality frontier"),
        (
            "p",
            f"From `{f.path}` ({what}; dense {f.dense.parameters / 1e6:.1f}M parameters, {f.domain_task} NLL "
            f"{f.dense.domain.nll:.3f}).{tput}",
        ),
        *[("p", s) for s in frontier.sentences(f)],
    ]
    if "frontier" in plot_files:
        b.append(("img", "frontier", "domain NLL against parameters (dashed: dense; stars: this run)"))
    return b


def _frontier_marks(data: dict, f: frontier.Frontier) -> list[tuple[str, int, float]]:
    """The run's own variants on the frontier's axes: the pick, and the pruned model before recovery."""
    col = next((c for c in data["columns"] if c.key.startswith(f.domain_task + "|") and c.key.endswith("|nll")), None)
    ans = answer.pick(data)
    rows = [ans.row] if ans else []
    rows += [r for r in data["rows"] if r.name == "pruned" and r not in rows]
    if col is None:
        return []
    return [(r.label, r.params, v) for r in rows if r.params and (v := r.values.get(col.key)) is not None]


def _variants_blocks(data: dict) -> list[tuple]:
    return [
        ("h2", "Variants"),
        (
            "table",
            ["Variant", "Label", "What", "Stage folders"],
            [[n, v.label, v.description, ", ".join(v.stages.values())] for n, v in data["manifest"].variants.items()],
        ),
    ]


def _selection_blocks(data: dict, plot_files: dict[str, bytes]) -> list[tuple]:
    curate_dir = tables.main_folder(data, "curate")
    if curate_dir is None:
        return []
    ev = tables.selection_evidence(curate_dir)
    if ev.metrics is None:
        return []
    mm, sae = ev.metrics, ev.metrics.sae_curation
    layers = tables.fmt(sae.layers if sae else None)
    b: list[tuple] = [
        ("h2", "Selection evidence"),
        (
            "p",
            f"`{curate_dir.relative_to(data['run_dir'])}`: {mm.selected} of {mm.pool_records} pool "
            f"records selected with seeds `{ev.config.get('seeds')}` (method `{mm.method}`, "
            f"selector `{ev.config.get('selector')}`, layers {layers}). Selected by source: "
            + card._top(mm.selected_sources, 10)
            + ".",
        ),
    ]
    for layer, s in (sae.sae if sae else {}).items():
        b.append(
            (
                "p",
                f"SAE {layer}: FVU {tables.fmt(s.fvu)}, L0 {tables.fmt(s.l0, 1)}, dead "
                f"fraction {tables.fmt(s.dead_fraction)}, {s.tokens} training tokens.",
            )
        )
    if "scores" in plot_files:
        b.append(("img", "scores", "selection scores: selected vs rest"))
    if "sae" in plot_files:
        b.append(("img", "sae", "SAE training curves"))
    for layer, lat in ev.latents.items():
        b.append(("h3", f"Top shared SAE latents ({layer})"))
        b.append(
            (
                "table",
                ["latent", "seed mean", "selected mean", "pool mean", "top pool snippets"],
                [
                    [
                        f.latent,
                        tables.fmt(f.seed_mean_activation),
                        tables.fmt(f.selected_mean_activation),
                        tables.fmt(f.pool_mean_activation),
                        " ‖ ".join(f"[{s.source}, {s.activation:.2f}] {s.text}" for s in f.top_pool_snippets),
                    ]
                    for f in lat
                ],
            )
        )
    b.append(("h3", "Sample of selected records"))
    b.append(
        (
            "table",
            ["rank", "source", "score", "nearest seed", "text"],
            [[r["rank"], r["source"], tables.fmt(r["score"]), r["nearest_seed"], r["text"]] for r in ev.selected],
        )
    )
    return b


def _stage_folders(data: dict, stage: str) -> list[str]:
    return [s["folder"] for s in data["stages"] if s["stage"] == stage]


def _pruning_blocks(data: dict, plot_files: dict[str, bytes]) -> list[tuple]:
    found = {k: tables.prune_report(data["run_dir"] / k) for k in _stage_folders(data, "prune")}
    prunes = {k: v for k, v in found.items() if v}
    if not prunes:
        return []
    shape_keys = ("layers", "attention_heads", "kv_heads", "mlp_width")
    b: list[tuple] = [
        ("h2", "Pruning"),
        (
            "table",
            [
                "folder",
                "params before → after",
                "removed",
                "layers",
                "heads",
                "KV heads",
                "MLP width",
                "importance",
                "calibration",
                "reload verified",
            ],
            [
                [
                    k,
                    f"{p.parameters.before / 1e6:.1f}M → {p.parameters.after / 1e6:.1f}M",
                    f"{100 * p.parameters.ratio:.1f}%",
                    *[f"{getattr(p.shapes_before, x)}→{getattr(p.shapes_after, x)}" for x in shape_keys],
                    p.importance,
                    f"{p.calibration.records} records",
                    str(p.verification.logits_match),
                ]
                for k, p in prunes.items()
            ],
        ),
    ]
    if "widths" in plot_files:
        b.append(("img", "widths", "kept widths"))
    return b


def _recovery_blocks(data: dict, plot_files: dict[str, bytes]) -> list[tuple]:
    found = {k: tables.recovery(data["run_dir"] / k) for k in _stage_folders(data, "recover")}
    recovers = {k: v for k, v in found.items() if v}
    if not recovers:
        return []
    b: list[tuple] = [
        ("h2", "Recovery"),
        (
            "table",
            [
                "folder",
                "mode",
                "records",
                "rewrite acceptance",
                "filter counts",
                "train ex.",
                "steps",
                "held-out loss before → after",
            ],
            [
                [
                    k,
                    tables.recovery_mode(r.metrics),
                    r.metrics.records,
                    tables.fmt(r.metrics.filters.acceptance_rate),
                    ", ".join(f"{a} {n}" for a, n in r.metrics.filters.counts.items()),
                    r.metrics.train.train_examples,
                    r.metrics.train.total_steps,
                    f"{tables.fmt(r.eval_loss_first)} → {tables.fmt(r.eval_loss_last)}",
                ]
                for k, r in recovers.items()
            ],
        ),
    ]
    if "recovery" in plot_files:
        b.append(("img", "recovery", "recovery: train and held-out CE per response token"))
    return b


def _timings_blocks(data: dict) -> list[tuple]:
    header, body = tables.timings_table(data)
    b: list[tuple] = [
        ("h2", "Timings"),
        ("table", header, body),
        (
            "note",
            f"Seconds are wall time of each stage when the pipeline ran it (a stage shared by "
            f"several variants runs once). Last invocation: {data['manifest'].last_run_wall_s} s. "
            f"Config: `pipeline.yaml` in the run directory.",
        ),
    ]
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
        elif kind == "pre":
            out.append(_fenced(blk[1]))
    return "\n".join(out)


def _fenced(text: str) -> str:
    """`text` verbatim in a Markdown code fence longer than any backtick run inside it."""
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return f"{fence}text\n{text}\n{fence}\n"


def _inline_code(text: str) -> str:
    """Escaped HTML of a Markdown line with its `code` and **bold** spans."""
    parts = _BOLD.sub(r"<strong>\1</strong>", html.escape(text)).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


_BOLD = re.compile(r"\*\*(.+?)\*\*")


def render_html(blocks: list[tuple], plot_files: dict[str, bytes], title: str) -> str:
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>"
    ]
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
        elif kind == "pre":
            out.append(f"<pre>{html.escape(blk[1])}</pre>")
        elif kind == "img":
            data = base64.b64encode(plot_files[blk[1]]).decode("ascii")
            out.append(
                f"<figure><img alt='{html.escape(blk[2])}' src='data:image/png;base64,{data}'>"
                f"<figcaption class='note'>{html.escape(blk[2])}</figcaption></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out)


def final_variant(data: dict) -> str | None:
    """The variant whose model gets the card when the answer (answer.pick) has none: FineScope + KD first (the default's best recovery), then FineScope
    (pruned + TGD), else the last one with a model."""
    variants = data["manifest"].variants
    for name in ("pruned_kd", "pruned_tgd", *reversed([n for n in variants if not n.startswith("sweep@")])):
        v = variants.get(name)
        if v and ("recover" in v.stages or "prune" in v.stages):
            return name
    return None


def write_report(run_dir: str | Path, frontier_file: str | Path | None = None) -> Path:
    """(Re)write the report of a run directory from its files (and a frontier file: the one given, else
    `<run>/frontier.json` when present); return the path of report.html."""
    run_dir = Path(run_dir).resolve()
    data = tables.collect(run_dir)
    data["frontier"] = frontier.find(run_dir, frontier_file)  # a bad file is refused before anything is written
    m = data["manifest"]
    figs = {k: v for k, v in _figures(data).items() if v}
    out = run_dir / "report"
    for name, png in figs.items():
        storage.write_atomic(out / "plots" / f"{name}.png", png)
    ans = answer.pick(data)
    variant = ans.row.name if ans else final_variant(data)
    if variant is not None:
        stages = m.variants[variant].stages
        model_dir = run_dir / stages.get("recover", stages.get("prune")) / "model"
        if model_dir.is_dir():
            storage.write_atomic(model_dir / "README.md", card.model_card(data, variant, model_dir))
            data["card"] = str(model_dir / "README.md")
    blocks = _blocks(data, figs)
    storage.write_atomic(out / "report.md", render_markdown(blocks))
    html_path = storage.write_atomic(out / "report.html", render_html(blocks, figs, f"FineScope run {m.name}"))
    return html_path


def _figures(data: dict) -> dict[str, bytes | None]:
    run_dir = data["run_dir"]
    curate_dir = tables.main_folder(data, "curate")
    return {
        "metrics": plots.metrics_per_variant(data),
        "sweep": plots.ratio_sweep(data["sweep"]),
        "scores": plots.score_histograms({k: run_dir / k for k in _stage_folders(data, "curate")}),
        "sae": plots.sae_curves(tables.selection_evidence(curate_dir).metrics) if curate_dir else None,
        "widths": plots.kept_widths({k: tables.prune_report(run_dir / k) for k in _stage_folders(data, "prune")}),
        "recovery": plots.recovery_curves({k: tables.recovery(run_dir / k) for k in _stage_folders(data, "recover")}),
        "frontier": frontier.plot(f, _frontier_marks(data, f)) if (f := data.get("frontier")) else None,
    }
