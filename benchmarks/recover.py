"""Recovery benchmark on SmolLM2-135M-Instruct: domain NLL of dense / pruned / pruned+SFT / pruned+TGD, the
teacher's acceptance rate by reason, seconds per step. Prints JSON (also written to <work>/recover_bench.json).

    nice -n 5 .venv/bin/python benchmarks/recover.py --work runs/bench-recover --records 40
    .venv/bin/python benchmarks/recover.py --work runs/bench-recover-real --records 0 \
        --data runs/default/curate/<folder>/selected.jsonl --student runs/default/prune/<folder>/model \
        --epochs 2 --batch-size 16 --sweep-lrs 2e-4,5e-4 --sweep-epochs 2,4

Inputs (the output labels which were used):
- curated set: `--data FILE` (a curate stage's selected.jsonl; `--records N` keeps the first N, 0 = all); without
  it a STAND-IN: the packaged evals math sets (simple_math, math_for_5th-grader, then jee-math multiple choice).
- pruned model: `--student DIR` (a prune stage's model/); else with `--pruner standin` (default) a uniform
  magnitude slicing written here (q heads 9->6, MLP width solved so that total parameters drop by `--ratio`),
  with `--pruner cli` the `finescope prune` command as a user runs it.
- recipe sweep: `--sweep-lrs` x `--sweep-epochs`, SFT and TGD each, fine-tuning on the same rewrites.
Domain NLL: completion-only NLL of GSM8K *test* answers (calculator annotations <<…>> removed) under the chat
template, token-weighted; GSM8K is evaluation data and is never trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from finescope import assets
from finescope.config import RecoverConfig
from finescope.data import read_records
from finescope.modeling import load, resolve_model_path
from finescope.recover.finetune import build_examples, mean_loss
from finescope.recover.run import run

EVALS_SETS = ("simple_math/simple_math.jsonl", "math_for_5th-grader/samples.jsonl", "jee-math/samples.jsonl")


def math_standin(n: int) -> list[dict]:
    out = []
    for name in EVALS_SETS:
        path = assets.package_file("evals", f"evals/registry/data/{name}")
        for i, line in enumerate(open(path, encoding="utf-8")):
            if not line.strip():
                continue
            row = json.loads(line)
            turns = {m["role"]: m["content"] for m in row["input"]}
            ideal = row["ideal"] if isinstance(row["ideal"], str) else row["ideal"][0]
            if name.startswith("jee"):  # its ideal is a phrase the system prompt asks to end with
                ideal = "Therefore, " + ideal
            out.append({"id": f"{name.split('/')[0]}-{i}", "system": turns.get("system", ""),
                        "instruction": turns["user"], "response": ideal})
            if len(out) >= n:
                return out
    return out


def gsm8k_nll_records(n: int) -> list[dict]:
    recs = read_records(assets.data_path("gsm8k"), limit=n)
    return [{**r, "response": re.sub(r"<<[^>]*>>", "", r["response"])} for r in recs]


def domain_nll(model_dir: str, records: list[dict]) -> float:
    h = load(model_dir, device="cpu")
    examples, _ = build_examples(h.tokenizer, records, max_length=512)
    return round(mean_loss(h.model, examples, h.tokenizer.pad_token_id, micro_batch_size=8), 4)


# ------------------------------------------------------------------------------------------------ stand-in pruner


def _params(n_layers, hidden, heads, kv, head_dim, mlp, vocab, tied) -> int:
    attn = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2
    per_layer = attn + 3 * hidden * mlp + 2 * hidden
    return n_layers * per_layer + vocab * hidden * (1 if tied else 2) + hidden


@torch.no_grad()
def standin_prune(dense_dir: str, out: Path, ratio: float) -> dict:
    """Uniform magnitude slicing (stand-in for `finescope prune`): keep 2 of 3 q heads per KV group by ‖W_q‖+‖W_o‖,
    and the MLP channels with the largest ‖gate‖+‖up‖+‖down‖, width solved to remove `ratio` of all parameters."""
    from transformers import AutoModelForCausalLM

    h = load(dense_dir, device="cpu")
    model, a = h.model, h.adapter
    c = a.config
    total = sum(p.numel() for p in model.parameters())
    groups, per_group = a.num_kv_heads, a.num_heads // a.num_kv_heads
    keep_per_group = max(1, per_group - 1)
    heads = groups * keep_per_group
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    target = total * (1 - ratio)
    mlp = a.intermediate_size
    while mlp > 8 and _params(a.num_layers, a.hidden_size, heads, groups, a.head_dim, mlp, a.vocab_size, tied) > target:
        mlp -= 8
    hd, heads0, mlp0 = a.head_dim, a.num_heads, a.intermediate_size
    sd = {}
    for i in range(a.num_layers):
        at, ml = a.attention(i), a.mlp(i)
        q = at.q_proj.weight.view(a.num_heads, hd, -1)
        o = at.o_proj.weight.view(-1, a.num_heads, hd)
        score = q.pow(2).sum((1, 2)) + o.pow(2).sum((0, 2))
        keep = []
        for g in range(groups):
            idx = torch.arange(g * per_group, (g + 1) * per_group)
            keep += sorted(idx[score[idx].argsort(descending=True)[:keep_per_group]].tolist())
        keep_t = torch.tensor(keep)
        sd[f"model.layers.{i}.self_attn.q_proj.weight"] = q[keep_t].reshape(heads * hd, -1).clone()
        sd[f"model.layers.{i}.self_attn.o_proj.weight"] = o[:, keep_t].reshape(-1, heads * hd).clone()
        ch = ml.gate_proj.weight.norm(dim=1) + ml.up_proj.weight.norm(dim=1) + ml.down_proj.weight.norm(dim=0)
        top = ch.argsort(descending=True)[:mlp].sort().values
        sd[f"model.layers.{i}.mlp.gate_proj.weight"] = ml.gate_proj.weight[top].clone()
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = ml.up_proj.weight[top].clone()
        sd[f"model.layers.{i}.mlp.down_proj.weight"] = ml.down_proj.weight[:, top].clone()
    full = model.state_dict()
    for k, v in full.items():
        sd.setdefault(k, v)
    c.num_attention_heads, c.intermediate_size, c.head_dim = heads, mlp, hd
    pruned = AutoModelForCausalLM.from_config(c, dtype=torch.float32)
    missing, unexpected = pruned.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("lm_head") for k in missing), (missing, unexpected)
    pruned.tie_weights()
    pruned.generation_config = model.generation_config
    pruned.save_pretrained(out)
    h.tokenizer.save_pretrained(out)
    kept = sum(p.numel() for p in pruned.parameters())
    return {"pruner": "standin-uniform-magnitude", "q_heads": f"{heads0}->{heads}", "mlp": f"{mlp0}->{mlp}",
            "params_dense": total, "params_pruned": kept, "removed_fraction": round(1 - kept / total, 4)}


def cli_prune(data: Path, out: Path, ratio: float) -> dict:
    cmd = [sys.executable, "-m", "finescope.cli", "prune", "--model", "default", "--data", str(data),
           "--ratio", str(ratio), "--out", str(out)]
    subprocess.run(cmd, check=True)
    return {"pruner": "finescope prune", "command": " ".join(cmd[2:])}


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/bench-recover")
    p.add_argument("--records", type=int, default=40)
    p.add_argument("--nll-records", type=int, default=64)
    p.add_argument("--ratio", type=float, default=0.35)
    p.add_argument("--pruner", choices=["standin", "cli"], default="standin")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--sweep-lrs", default="", help="extra learning rates for SFT and TGD (reuses the rewrites)")
    p.add_argument("--sweep-epochs", default="", help="extra epoch counts for SFT and TGD (reuses the rewrites)")
    p.add_argument("--data", default="", help="the curated record file (e.g. a curate stage's selected.jsonl) "
                                              "instead of the stand-in math set")
    p.add_argument("--student", default="", help="an existing pruned model folder (e.g. a prune stage's model/) "
                                                 "instead of pruning here")
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
        data = work / "math_standin.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in math_standin(args.records)), encoding="utf-8")
        curated_label = f"STAND-IN: evals math sets {', '.join(EVALS_SETS)} (first {args.records} records)"
    pruned_dir = work / "prune" / "model"
    if args.student:
        pruned_dir = Path(args.student)
        report = pruned_dir.parent / "report.json"
        prune_info = {"pruner": "existing folder", "student": str(pruned_dir)}
        if report.is_file():
            r = json.loads(report.read_text())
            prune_info.update({k: r[k] for k in ("params_before", "params_after", "removed_fraction", "importance")
                               if k in r})
    elif args.pruner == "cli":
        prune_info = cli_prune(data, work / "prune", args.ratio)
    elif not (pruned_dir / "config.json").is_file():
        prune_info = standin_prune(dense, pruned_dir, args.ratio)
        (work / "prune" / "standin.json").write_text(json.dumps(prune_info))
    else:
        prune_info = json.loads((work / "prune" / "standin.json").read_text())

    def recipe(**kw) -> RecoverConfig:
        base = dict(teacher=dense, student=str(pruned_dir), data=str(data), max_new_tokens=args.max_new_tokens,
                    rewrite_batch_size=8, lora_rank=args.rank, lora_alpha=2 * args.rank, lr=args.lr,
                    batch_size=args.batch_size, micro_batch_size=4, max_length=256, epochs=args.epochs,
                    eval_fraction=0.1)
        base.update(kw)
        return RecoverConfig(**base)

    tgd = run(recipe(), work / "tgd")
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
            variants[f"tgd_{tag}"] = run(recipe(no_teacher=True, lr=lr, epochs=ep,
                                                data=str(tgd / "distilled.jsonl")), work / f"tgd_{tag}")

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
        "prune": {**prune_info, "label": ("existing folder" if args.student else
                                          "STAND-IN" if args.pruner == "standin" else "finescope prune")},
        "recipe": {k: v for k, v in json.loads((tgd / "config.json").read_text())["config"].items()
                   if k not in ("teacher", "student", "data")},
        "domain_nll": {"task": f"GSM8K test answers, first {len(nll_recs)}, completion-only", **nll},
        "nll_ratio_to_dense": {k: round(v / nll["dense"], 3) for k, v in nll.items()},
        "goal": {"tgd_within_1.10x_dense": nll["tgd"] <= 1.10 * nll["dense"], "tgd_no_worse_than_sft": nll["tgd"] <= nll["sft"]},
        "teacher": {"acceptance_rate": m_tgd["filters"]["acceptance_rate"], "by_reason": m_tgd["filters"]["counts"],
                    "rewrite_seconds": m_tgd["rewrite"].get("seconds"), "new_tokens": m_tgd["rewrite"].get("new_tokens"),
                    "tokens_per_second": m_tgd["rewrite"].get("tokens_per_second")},
        "train": {name: {"seconds_per_step": m["train"]["seconds_per_step"], "steps": m["train"]["total_steps"],
                         "eval_loss": [e["loss"] for e in m["train"]["eval_loss"]]}
                  for name, m in (("tgd", m_tgd), ("sft", m_sft))},
        "samples": [{"id": r["id"], "instruction": r["instruction"][:300], "original": r["original"],
                     "rewrite": r["rewrite"], "reason": r["reason"]} for r in samples],
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    text = json.dumps(result, indent=2, ensure_ascii=False)
    (work / "recover_bench.json").write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
