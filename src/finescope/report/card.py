"""The model card (`README.md`) written into the final model folder of a run."""

from __future__ import annotations

from pathlib import Path

from ..assets import PACKAGES
from . import tables


def used_assets(manifest) -> dict[str, list[str]]:
    """The embedded assets (finescope/assets.py PACKAGES keys) a run used, each with what for, from its resolved
    config (`pipeline.json`) and its variants: the model of its stages, the default pool (built from the evals
    registry and BBC News, decontaminated against every embedded benchmark) and the generic reference corpus when
    a curation read them, the generic calibration and replay text when a variant or recovery did, and the
    benchmarks of its eval tasks. An asset no setting of the run points at is not listed."""
    cfg = manifest.config or {}
    variants = manifest.variants.values()
    used: dict[str, list[str]] = {}

    def use(key: str, why: str) -> None:
        if why not in used.setdefault(key, []):
            used[key].append(why)

    models = {str(cfg.get("model") or manifest.model or "")}
    recover = cfg.get("recover") or {}
    models |= {str(recover.get(k)) for k in ("teacher", "student") if recover.get(k)}
    for spec in models:
        if spec in ("default", "smollm2"):
            use("smollm2", "base model")
        elif spec == "gemma3":
            use("gemma3", "base model")
    curate = cfg.get("curate") or {}
    data_kinds = {v.data for v in variants if v.data}
    if data_kinds and curate.get("pool", "default") == "default":
        use("evals", "default pool (its maths and other registry sets)")
        use("bbc", "default pool (news articles)")
        for key in ("mmlu", "gsm8k", "humaneval"):
            use(key, "decontamination of the default pool")
    if any(k == "sae" or k.startswith("sae:") for k in data_kinds) and curate.get("reference", "default") == "default":
        use("evals", "generic reference corpus (Wikipedia / OpenWebText snippets)")
        use("bbc", "generic reference corpus")
    if data_kinds & {"embedding", "hybrid"} or curate.get("method") in ("embedding", "hybrid"):
        use("minilm", "embedding-kNN selection")
    if any(v.prune == "generic" for v in variants) and cfg.get("generic_calibration", "default") == "default":
        use("evals", "generic calibration (Wikipedia / OpenWebText snippets)")
        use("bbc", "generic calibration")
    if any(v.recovery for v in variants) and recover.get("replay_fraction") and recover.get("replay") == "default":
        use("evals", "generic replay text")
        use("bbc", "generic replay text")
    for task in (cfg.get("eval") or {}).get("tasks") or []:
        name = str(task)
        asset = (
            "mmlu"
            if name.startswith("mmlu")
            else "gsm8k"
            if name in ("gsm8k", "nll:math", "answers:math")
            else "humaneval"
            if name.startswith("humaneval") or name == "nll:code"
            else None
        )
        if asset:
            use(asset, f"eval task {name}")
    return {k: used[k] for k in PACKAGES if k in used}


def licence_rows(manifest) -> list[list[str]]:
    """Licence table rows (asset, package, licence, used for) of the assets the run used (`used_assets`)."""
    return [
        [PACKAGES[k].contents, ", ".join(f"`{r}`" for r in PACKAGES[k].requirements), PACKAGES[k].licence, "; ".join(w)]
        for k, w in used_assets(manifest).items()
    ]


def model_card(data: dict, variant: str, model_dir: Path) -> str:
    """Markdown card: base model, seeds, selection statistics, pruning, recovery recipe, evaluation, licences."""
    m = data["manifest"]
    v = m.variants[variant]
    stages = {s: data["run_dir"] / p for s, p in v.stages.items()}
    out = [
        f"# {m.name or 'finescope'}: {v.label}",
        "",
        f"Derived with FineScope (SAE-guided curation → structured pruning → teacher-guided distillation) from "
        f'`{m.model}`. Loads with stock `AutoModelForCausalLM.from_pretrained("{model_dir}")`.',
        "",
        f"Variant `{variant}`: {v.description}.",
        "",
        "## Data",
        "",
    ]
    out += _data_section(stages.get("curate"))
    out += ["", "## Pruning", ""]
    out += _pruning_section(stages.get("prune"))
    out += ["", "## Recovery", ""]
    out += _recovery_section(stages.get("recover"))
    out += ["", "## Evaluation (whole run; this model is the row marked ★)", ""]
    header, body = tables.results_table(data)
    body = [[c + " ★" if i == 0 and row[0] == v.label else c for i, c in enumerate(row)] for row in body]
    out.append(tables.markdown_table(header, body))
    summary = tables.summary_note(data)
    if summary:
        out += [summary, ""]
    out += [
        "## Licences of the embedded assets this run used",
        "",
    ]
    rows = licence_rows(m)
    out.append(
        tables.markdown_table(["asset", "package", "licence", "used for"], rows)
        if rows
        else "None: every model and data set of this run came from the user."
    )
    out += [
        "",
        "The derived weights inherit the base model's licence; the curated data inherits its sources' terms.",
        "",
    ]
    return "\n".join(out)


def _data_section(curate: Path | None) -> list[str]:
    if curate is None:
        return ["- none (no curation in this variant)"]
    ev = tables.selection_evidence(curate, records=0)
    cc, mm = ev.config, ev.metrics
    if mm is None:
        return [f"- curation `{curate.name}` has not finished (no metrics.json)"]
    layers = mm.sae_curation.layers if mm.sae_curation is not None else None
    return [
        f"- seeds: `{cc.get('seeds')}` ({mm.seeds} examples); pool `{cc.get('pool')}` "
        f"({mm.pool_records} records encoded)",
        f"- selection: method `{cc.get('method')}`, selector `{cc.get('selector')}`, layers {tables.fmt(layers)}, "
        f"K = {cc.get('num_coords')}, SAE {cc.get('sae_kind')} ×{cc.get('sae_expansion')}, "
        f"{mm.selected} records kept (top_m {cc.get('top_m')}, {cc.get('selection')})",
        f"- selected sources: {_top(mm.selected_sources)}",
        f"- score quantiles, selected: {_q(mm.score_quantiles_selected)}; pool: {_q(mm.score_quantiles_pool)}",
    ]


def _pruning_section(prune: Path | None) -> list[str]:
    ps = tables.prune_report(prune) if prune is not None else None
    if ps is None:
        return ["- not pruned"]
    b, a, p = ps.shapes_before, ps.shapes_after, ps.parameters
    return [
        f"- parameters {p.before / 1e6:.1f}M → {p.after / 1e6:.1f}M "
        f"({100 * p.ratio:.1f}% removed; {100 * p.non_embedding_ratio:.1f}% of non-embedding); "
        f"target {ps.plan.ratio_target}",
        f"- shapes: layers {b.layers}→{a.layers}, heads {b.attention_heads}→{a.attention_heads}, "
        f"KV heads {b.kv_heads}→{a.kv_heads}, head_dim {b.head_dim}, MLP {b.mlp_width}→{a.mlp_width}",
        f"- importance `{ps.importance}`, heads pruned per `{ps.head_mode}`, calibration "
        f"{ps.calibration.records} records from `{ps.data}`",
    ]


def _recovery_section(recover: Path | None) -> list[str]:
    rs = tables.recovery(recover) if recover is not None else None
    if rs is None:
        return ["- none"]
    r, mm = rs.recipe, rs.metrics
    teacher = (
        f"; teacher `{r.get('teacher')}`, rewrite acceptance {mm.filters.acceptance_rate}" if mm.mode == "tgd" else ""
    )
    if mm.adapter == "full":
        how = "full fine-tuning (every weight)"
    else:
        how = f"LoRA r={r.get('lora_rank')}, α={r.get('lora_alpha')}, dropout {r.get('lora_dropout')}"
    return [
        f"- `{tables.recovery_mode(mm)}` on {mm.records} records" + teacher,
        f"- {how}, lr {r.get('lr')}, batch {r.get('batch_size')} (micro {r.get('micro_batch_size')}), {r.get('epochs')} epochs, "
        f"max_length {r.get('max_length')}" + ("; merged into the weights" if mm.adapter != "full" else ""),
        f"- held-out loss {tables.fmt(rs.eval_loss_first)} → {tables.fmt(rs.eval_loss_last)}",
    ]


def _top(counts: dict, n: int = 6) -> str:
    items = list(counts.items())
    s = ", ".join(f"{k} {v}" for k, v in items[:n])
    return s + (f", … ({len(items) - n} more)" if len(items) > n else "") if s else "–"


def _q(q: dict | None) -> str:
    if not q:
        return "–"
    return " / ".join(f"{k} {v:.3f}" for k, v in q.items())
