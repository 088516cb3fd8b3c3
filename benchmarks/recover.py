"""Recovery benchmark on SmolLM2-135M-Instruct: domain NLL of dense / pruned / pruned+SFT / pruned+TGD, the
teacher's acceptance rate by reason, seconds per step. Prints JSON (also written to <work>/recover_bench.json).

    nice -n 5 .venv/bin/python benchmarks/recover.py --work runs/bench-recover --records 40
    .venv/bin/python benchmarks/recover.py --work runs/bench-recover-real --records 0 \
        --data runs/default/curate/<folder>/selected.jsonl --student runs/default/prune/<folder>/model \
        --epochs 2 --batch-size 16 --sweep-lrs 2e-4,5e-4 --sweep-epochs 2,4

Inputs (the output labels which were used):
- curated set: `--data FILE` (a curate stage's selected.jsonl; `--records N` keeps the first N, 0 = all); without
  it a fixed math set, not a curation: the packaged evals math sets (simple_math, math_for_5th-grader, then
  jee-math multiple choice).
- pruned model: `--student DIR` (a prune stage's model/); else the prune stage run here on the curated set at
  `--ratio` (default settings: first-order Taylor importance, uniform widths) into <work>/prune, in this process
  (`--pruner stage`, default) or as the `finescope prune` command a user runs (`--pruner cli`).
- recipe sweep: `--sweep-lrs` x `--sweep-epochs`, SFT and TGD each, fine-tuning on the same rewrites.
Domain NLL: completion-only NLL of GSM8K *test* answers (calculator annotations <<…>> removed) under the chat
template, token-weighted; GSM8K is evaluation data and is never trained on.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from finescope import assets
from finescope.config import KD_SETTINGS, PipelineConfig, PruneConfig, RecoverConfig, load_config
from finescope.data import read_records
from finescope.modeling import load, resolve_model_path
from finescope.pipeline import resolve_config
from finescope.recover.finetune import build_examples, mean_loss
from finescope.recover.run import run

EVALS_SETS = ("simple_math/simple_math.jsonl", "math_for_5th-grader/samples.jsonl", "jee-math/samples.jsonl")


def evals_math_records(n: int) -> list[dict]:
    out = []
    for name in EVALS_SETS:
        path = assets.package_file("evals", f"evals/registry/data/{name}")
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            row = json.loads(line)
            turns = {m["role"]: m["content"] for m in row["input"]}
            ideal = row["ideal"] if isinstance(row["ideal"], str) else row["ideal"][0]
            if name.startswith("jee"):  # its ideal is a phrase the system prompt asks to end with
                ideal = "Therefore, " + ideal
            out.append(
                {
                    "id": f"{name.split('/')[0]}-{i}",
                    "system": turns.get("system", ""),
                    "instruction": turns["user"],
                    "response": ideal,
                }
            )
            if len(out) >= n:
                return out
    return out


def gsm8k_nll_records(n: int) -> list[dict]:
    recs = read_records(assets.data_path("gsm8k"), limit=n)
    return [{**r, "response": re.sub(r"<<[^>]*>>", "", r["response"])} for r in recs]


def domain_nll(model_dir: str, records: list[dict]) -> float:
    h = load(model_dir, device="cpu")
    examples, _ = build_examples(h.tokenizer, records, max_length=512)
    loss = mean_loss(h.model, examples, h.tokenizer.pad_token_id, micro_batch_size=8)
    if loss is None:
        raise SystemExit(f"{model_dir}: no NLL record fits 512 tokens")
    return round(loss, 4)


# ------------------------------------------------------------------------------------------------ pruning


def prune_summary(stage: Path) -> dict:
    """The figures of a prune stage's report.json that this benchmark prints (empty when there is none)."""
    report = stage / "report.json"
    if not report.is_file():
        return {}
    r = json.loads(report.read_text())
    before, after, params = r.get("shapes_before", {}), r.get("shapes_after", {}), r.get("parameters", {})
    out = {"importance": r.get("importance"), "head_mode": r.get("head_mode")}
    for key, name in (
        ("attention_heads", "q_heads"),
        ("kv_heads", "kv_heads"),
        ("mlp_width", "mlp"),
        ("layers", "layers"),
    ):
        if key in before and key in after:
            out[name] = f"{before[key]}->{after[key]}"
    if params:
        out.update(
            {
                "params_dense": params.get("before"),
                "params_pruned": params.get("after"),
                "removed_fraction": round(params["ratio"], 4) if "ratio" in params else None,
            }
        )
    return out


def stage_prune(data: Path, out: Path, ratio: float) -> dict:
    """The prune stage in this process, as `finescope prune` runs it (skipped when `out` is done with this config)."""
    # import_module names the stage module whether or not the package re-exports a `run` function over it
    prune_stage = importlib.import_module("finescope.prune.run")
    prune_stage.run(PruneConfig(model="default", data=str(data), ratio=ratio), out)
    return {"pruner": "finescope prune (in process)", **prune_summary(out)}


def cli_prune(data: Path, out: Path, ratio: float) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "finescope.cli",
        "prune",
        "--model",
        "default",
        "--data",
        str(data),
        "--ratio",
        str(ratio),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True)
    return {"pruner": "finescope prune", "command": " ".join(cmd[2:]), **prune_summary(out)}


# ------------------------------------------------------------------------------------------------ budgeted recipes

# Relative cost per record-epoch against LoRA cross-entropy (the reference TGD run's measured seconds), used only
# to size each recipe's epochs to the budget; the wall times printed are measured.
COST = {"lora": 1.0, "lora+kd": 1.1, "full": 1.35, "full+kd": 1.45}
TEACHER_PASS = 0.5  # one teacher forward per record (KD cache), in the same unit


def budget_recipes(phase: int, best: dict | None) -> list[tuple[str, dict]]:
    """(name, RecoverConfig overrides) of a sweep phase. Phase 0: SFT, TGD and the KD grid; phase 1: the grid's
    best α/τ over every token without rewrites, over every token with rewrites, with full fine-tuning; phase 2: the
    best recipe so far with generic replay."""
    if phase == 0:
        grid = [
            (f"tgd+kd a{a:g} t{t:g}", {"rewrites": True, "kd_weight": a, "kd_temperature": t})
            for a in (0.5, 1.0)
            for t in (1.0, 2.0)
        ]
        return [("sft", {"rewrites": False, "no_teacher": True}), ("tgd", {"rewrites": True}), *grid]
    assert best is not None
    b = {k: v for k, v in best.items() if k != "row"}
    if phase == 1:
        kd = {"kd_weight": b["kd_weight"], "kd_temperature": b["kd_temperature"]}
        return [
            ("kd all tokens, no rewrites", {**kd, "rewrites": False, "kd_scope": "all"}),
            ("tgd+kd all tokens", {**kd, "rewrites": True, "kd_scope": "all"}),
            ("tgd+kd full", {**kd, "rewrites": True, "adapter": "full", "lr": 1e-4}),
        ]
    return [(f"{best['row']} + replay 0.25", {**b, "replay_fraction": 0.25})]


def run_budgeted(recipe, work: Path, reference: Path, data: Path, budget: float, nll_recs, dense: str) -> dict:
    """Every recipe at the same wall-clock budget as the TGD reference x the budget factor; NLL of each."""
    ref = json.loads((reference / "metrics.json").read_text())
    n_train = ref["train"]["train_examples"]
    rewrite_s = ref["seconds"]["rewrite"]
    unit = ref["seconds"]["finetune"] / (n_train * ref["train"]["epochs_run"])  # s per record-epoch, LoRA CE
    rows: dict[str, dict] = {}
    settings: dict[str, dict] = {}
    best: dict | None = None
    picks = []
    for phase in (0, 1, 2):
        for name, over in budget_recipes(phase, best):
            settings[name] = dict(over)
            over = dict(over)
            rewrites = over.pop("rewrites")
            kd = over.get("kd_weight", 0) > 0
            adapter = over.get("adapter", "lora")
            n = n_train + (round(n_train * over.get("replay_fraction", 0)))
            if over.get("recover_top_m"):
                n = int(over["recover_top_m"] * 0.9)
            fixed = (rewrite_s if rewrites else 0.0) + (TEACHER_PASS * unit * n if kd else 0.0)
            per_epoch = unit * n * COST[adapter + ("+kd" if kd else "")]
            epochs = max(1.0, round(2 * (budget - fixed - 5) / per_epoch) / 2)
            if rewrites:  # train on the reference run's rewrites (what the TGD run used), charged its rewrite time
                over.update(data=str(reference / "distilled.jsonl"), no_rewrite=True)
            elif not over.get("no_teacher"):
                over.update(no_rewrite=True)
            if over.get("recover_top_m"):
                over["data"] = str(data)  # next-ranked records need the curate folder beside --data
            cfg = recipe(**over, epochs=epochs)
            out = run(cfg, work / ("budget-" + "".join(c if c.isalnum() or c in ".-" else "_" for c in name)))
            m = json.loads((out / "metrics.json").read_text())
            charged = rewrite_s if rewrites and cfg.no_rewrite else 0.0
            wall = m["seconds"]["total"] + charged
            rows[name] = {
                "epochs": epochs,
                "train_records": m["train"]["train_examples"],
                "wall_s": round(wall, 1),
                "of_budget": round(wall / budget, 2),
                "nll": domain_nll(str(out / "model"), nll_recs),
                "heldout_vs_seconds": [(e["seconds"], e["loss"]) for e in m["train"]["eval_loss"]],
                "kd_targets_s": m["seconds"].get("kd_targets"),
                "finetune_s": m["seconds"]["finetune"],
                "folder": str(out),
            }
            print(json.dumps({name: rows[name]}), flush=True)
        if phase == 0:
            grid = {k: v for k, v in rows.items() if k.startswith("tgd+kd")}
            top = min(grid, key=lambda k: grid[k]["nll"])
            best = {**settings[top], "row": top}
        else:
            top = min(rows, key=lambda k: rows[k]["nll"])
            best = {**settings[top], "row": top}
        picks.append(best)
    return {"rows": rows, "best_after_each_phase": picks}


def run_data_sweep(recipe, work: Path, reference: Path, budget: float, nll_recs, sizes, weights) -> dict:
    """The embedded default's kd recipe (configs/default.yaml) on the curation's top M records for each M, and with
    each KD weight α (α < 1 adds cross-entropy on the original responses), epochs sized to the same budget: more
    records for fewer epochs, or fewer records for more."""
    kd = load_config(PipelineConfig, resolve_config("default"))
    ref = json.loads((reference / "metrics.json").read_text())
    n_train = ref["train"]["train_examples"]
    unit = ref["seconds"]["finetune"] / (n_train * ref["train"]["epochs_run"])
    over = {k: getattr(kd.recover, k) for k in KD_SETTINGS}
    rows = {}
    for m in sizes:
        for alpha in weights or [over["kd_weight"]]:
            n = int(m * 0.9)
            fixed = TEACHER_PASS * unit * n
            epochs = max(1.0, round(2 * (budget - fixed - 5) / (unit * n * COST["lora+kd"])) / 2)
            cfg = recipe(**{**over, "kd_weight": alpha}, recover_top_m=m, epochs=epochs)
            name = f"top {m}, a {alpha:g}"
            out = run(cfg, work / f"data-top{m}-a{alpha:g}")
            mt = json.loads((out / "metrics.json").read_text())
            rows[name] = {
                "epochs": epochs,
                "train_records": mt["train"]["train_examples"],
                "data": mt.get("data"),
                "wall_s": round(mt["seconds"]["total"], 1),
                "of_budget": round(mt["seconds"]["total"] / budget, 2),
                "nll": domain_nll(str(out / "model"), nll_recs),
                "heldout_vs_seconds": [(e["seconds"], e["loss"]) for e in mt["train"]["eval_loss"]],
                "folder": str(out),
            }
            print(json.dumps({name: rows[name]}), flush=True)
    return {"recipe": {k: str(v) for k, v in over.items()}, "rows": rows}


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/bench-recover")
    p.add_argument("--records", type=int, default=40)
    p.add_argument("--nll-records", type=int, default=64)
    p.add_argument("--ratio", type=float, default=0.35)
    p.add_argument(
        "--pruner",
        choices=["stage", "cli"],
        default="stage",
        help="run the prune stage in this process, or as the `finescope prune` command",
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--rewrite-batch-size", type=int, default=8)
    p.add_argument("--sweep-lrs", default="", help="extra learning rates for SFT and TGD (reuses the rewrites)")
    p.add_argument("--sweep-epochs", default="", help="extra epoch counts for SFT and TGD (reuses the rewrites)")
    p.add_argument(
        "--data",
        default="",
        help="the curated record file (e.g. a curate stage's selected.jsonl) instead of the fixed evals math set",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=0.0,
        help="run the budgeted recipe sweep (TGD, TGD + KD grid, KD without rewrites, full fine-tuning, replay, "
        "more records) with this wall-clock budget as a multiple of the reference TGD run's stage time (e.g. 1.5)",
    )
    p.add_argument(
        "--data-sweep",
        default="",
        help="with --budget: instead of the recipe sweep, the default's kd recipe on the curation's top M records "
        "for each M of this comma list (e.g. 100,200,300), each at the budget",
    )
    p.add_argument(
        "--kd-weights", default="", help="with --data-sweep: each α of this comma list (default: the preset's)"
    )
    p.add_argument(
        "--student",
        default="",
        help="an existing pruned model folder (e.g. a prune stage's model/) instead of pruning here",
    )
    args = p.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dense = resolve_model_path("default")
    if args.data:
        data = Path(args.data)
        curated_label = f"{data} (first {args.records} records)" if args.records else str(data)
        if args.records:
            recs = read_records(data, limit=args.records)
            data = work / "curated.jsonl"
            data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    else:
        data = work / "evals_math.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in evals_math_records(args.records)), encoding="utf-8")
        curated_label = f"not curated: evals math sets {', '.join(EVALS_SETS)} (first {args.records} records)"
    pruned_dir = work / "prune" / "model"
    if args.student:
        pruned_dir = Path(args.student)
        prune_info = {"pruner": "existing folder", "student": str(pruned_dir), **prune_summary(pruned_dir.parent)}
    elif args.pruner == "cli":
        prune_info = cli_prune(data, work / "prune", args.ratio)
    else:
        prune_info = stage_prune(data, work / "prune", args.ratio)

    def recipe(**kw) -> RecoverConfig:
        base = {
            "teacher": dense,
            "student": str(pruned_dir),
            "data": str(data),
            "max_new_tokens": args.max_new_tokens,
            "rewrite_batch_size": args.rewrite_batch_size,
            "lora_rank": args.rank,
            "lora_alpha": 2 * args.rank,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "micro_batch_size": args.micro_batch_size,
            "max_length": 256,
            "epochs": args.epochs,
            "eval_fraction": 0.1,
        }
        base.update(kw)
        return RecoverConfig(**base)

    tgd = run(recipe(), work / "tgd")
    if args.budget:
        nll_recs = gsm8k_nll_records(args.nll_records)
        m_ref = json.loads((tgd / "metrics.json").read_text())
        budget = args.budget * m_ref["seconds"]["total"]
        nll = {"dense": domain_nll(dense, nll_recs), "pruned": domain_nll(str(pruned_dir), nll_recs)}
        reference = {
            "epochs": args.epochs,
            "wall_s": m_ref["seconds"]["total"],
            "nll": domain_nll(str(tgd / "model"), nll_recs),
            "heldout_vs_seconds": [(e["seconds"], e["loss"]) for e in m_ref["train"]["eval_loss"]],
        }
        if args.data_sweep:
            sizes = [int(x) for x in args.data_sweep.split(",") if x.strip()]
            weights = [float(x) for x in args.kd_weights.split(",") if x.strip()]
            sweep = run_data_sweep(recipe, work, tgd, budget, nll_recs, sizes, weights)
        else:
            sweep = run_budgeted(recipe, work, tgd, Path(args.data or data), budget, nll_recs, dense)
        result = {
            "model": "SmolLM2-135M-Instruct (embedded default)",
            "curated_set": curated_label,
            "prune": {**prune_info, "label": "existing folder" if args.student else "finescope prune"},
            "reference_tgd": reference,
            "budget_s": round(budget, 1),
            "budget_rule": f"{args.budget}x the reference TGD stage time; rewrites reused from it and charged",
            "domain_nll": {"task": f"GSM8K test answers, first {len(nll_recs)}, completion-only", **nll},
            **sweep,
            "wall_seconds": round(time.perf_counter() - t0, 1),
        }
        text = json.dumps(result, indent=2, ensure_ascii=False)
        name = "recover_data_sweep.json" if args.data_sweep else "recover_budget.json"
        (work / name).write_text(text + "\n", encoding="utf-8")
        print(text)
        return
    sft = run(recipe(no_teacher=True), work / "sft")
    variants = {"tgd": tgd, "sft": sft}
    # Sweeps fine-tune on the same rewrites: TGD = plain fine-tuning on distilled.jsonl, whose `response` is the
    # text the TGD run used (accepted rewrite or the original it fell back to).
    lrs = [float(x) for x in args.sweep_lrs.split(",") if x.strip()] or [args.lr]
    epochs = [float(x) for x in args.sweep_epochs.split(",") if x.strip()] or [args.epochs]
    for lr in lrs:
        for ep in epochs:
            if lr == args.lr and ep == args.epochs:
                continue
            tag = f"lr{lr:g}_ep{ep:g}"
            variants[f"sft_{tag}"] = run(recipe(no_teacher=True, lr=lr, epochs=ep), work / f"sft_{tag}")
            variants[f"tgd_{tag}"] = run(
                recipe(no_teacher=True, lr=lr, epochs=ep, data=str(tgd / "distilled.jsonl")), work / f"tgd_{tag}"
            )

    nll_recs = gsm8k_nll_records(args.nll_records)
    nll = {"dense": domain_nll(dense, nll_recs), "pruned": domain_nll(str(pruned_dir), nll_recs)}
    for name, path in variants.items():
        nll[name] = domain_nll(str(path / "model"), nll_recs)
    m_tgd = json.loads((tgd / "metrics.json").read_text())
    m_sft = json.loads((sft / "metrics.json").read_text())
    rows = [json.loads(l) for l in (tgd / "distilled.jsonl").read_text().splitlines()]
    accepted = [r for r in rows if r["used"] == "rewrite"]
    samples = (accepted + [r for r in rows if r["used"] != "rewrite"])[:3]
    result = {
        "model": "SmolLM2-135M-Instruct (embedded default)",
        "curated_set": curated_label,
        "prune": {**prune_info, "label": "existing folder" if args.student else "finescope prune"},
        "recipe": {
            k: v
            for k, v in json.loads((tgd / "config.json").read_text())["config"].items()
            if k not in ("teacher", "student", "data")
        },
        "domain_nll": {"task": f"GSM8K test answers, first {len(nll_recs)}, completion-only", **nll},
        "nll_ratio_to_dense": {k: round(v / nll["dense"], 3) for k, v in nll.items()},
        "goal": {
            "tgd_within_1.10x_dense": nll["tgd"] <= 1.10 * nll["dense"],
            "tgd_no_worse_than_sft": nll["tgd"] <= nll["sft"],
        },
        "teacher": {
            "acceptance_rate": m_tgd["filters"]["acceptance_rate"],
            "by_reason": m_tgd["filters"]["counts"],
            "rewrite_seconds": m_tgd["rewrite"].get("seconds"),
            "new_tokens": m_tgd["rewrite"].get("new_tokens"),
            "tokens_per_second": m_tgd["rewrite"].get("tokens_per_second"),
        },
        "train": {
            name: {
                "seconds_per_step": m["train"]["seconds_per_step"],
                "steps": m["train"]["total_steps"],
                "eval_loss": [e["loss"] for e in m["train"]["eval_loss"]],
            }
            for name, m in (("tgd", m_tgd), ("sft", m_sft))
        },
        "samples": [
            {
                "id": r["id"],
                "instruction": r["instruction"][:300],
                "original": r["original"],
                "rewrite": r["rewrite"],
                "reason": r["reason"],
            }
            for r in samples
        ],
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    text = json.dumps(result, indent=2, ensure_ascii=False)
    (work / "recover_bench.json").write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
