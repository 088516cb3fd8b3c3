"""The prune stage: calibration records → importance → uniform shapes → sliced, saved, self-verified model.

    finescope prune --model default --data runs/demo/curate/selected.jsonl --ratio 0.35 --out runs/demo/prune

writes `model/` (stock `save_pretrained`: safetensors, rewritten config, tokenizer, generation config),
`report.json` (parameters before/after, per-layer kept indices, importance summaries, timings, peak memory,
verification), `config.json`, `metrics.json` and `DONE`. Before DONE, the saved folder is reloaded with stock
`AutoModelForCausalLM.from_pretrained` in a fresh process: its logits must equal the in-memory pruned model's
and greedy generation must give the same tokens with and without the KV cache.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import FinescopeError, distributed, stage_protocol, storage
from ..artifacts import (
    Calibration,
    KeptLayer,
    LayerImportance,
    ModelShapes,
    ParameterCounts,
    PeakMemory,
    PruneCompensation,
    PruneMetrics,
    PrunePlan,
    PruneReport,
    PruneTimings,
    Verification,
)
from ..config import PruneConfig
from ..data import read_records
from ..modeling import load, model_info
from ..ranking import next_ranked, without_eval_overlap
from . import compensate
from .importance import (
    calibration_batches,
    compute_scores,
    runs_a_pass,
    select_attention,
    select_blocks,
    select_channels,
)
from .solver import solve
from .structure import drop_blocks, model_shapes, prune_attention, prune_mlp, rewrite_config


class PruneError(FinescopeError):
    """The prune stage cannot run with these inputs, or its output failed self-verification."""


def _log(msg: str) -> None:
    print(f"prune: {msg}", file=sys.stderr, flush=True)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plan_kept(adapter, scores, plan: PrunePlan, head_mode: str) -> dict:
    """Which blocks go and, per kept block (original numbering), which heads, KV heads and channels stay."""
    dropped = select_blocks(scores, plan.depth)
    layers = []
    for orig in [i for i in range(adapter.num_layers) if i not in set(dropped)]:
        heads, kv = select_attention(
            scores.heads[orig], scores.kv[orig], heads=plan.heads, kv_heads=plan.kv_heads, mode=head_mode
        )
        channels = select_channels(scores.channels[orig], plan.intermediate)
        layers.append({"layer": orig, "heads": heads, "kv_heads": kv, "channels": channels})
    return {"dropped_blocks": dropped, "layers": layers}


@dataclass
class Compensation:
    """Compensation at prune time: its mode, ridge and inputs, and what the fit reads — the dense model's
    calibration statistics (inputs "dense") or the calibration batches themselves (inputs "pruned", block by
    block)."""

    mode: str
    ridge: float
    stats: compensate.Stats | None = None
    inputs: str = "dense"
    batches: list[dict] | None = None


def prune_model(handle, scores, plan: PrunePlan, head_mode: str, compensation: Compensation | None = None) -> dict:
    """Drop blocks and slice every layer to the plan's shapes in place (compensating the kept o_proj / down_proj
    when asked); return the kept indices per layer and the parameters compensation added."""
    adapter = handle.adapter
    kept = plan_kept(adapter, scores, plan, head_mode)
    had_bias = compensate.biased(adapter)

    def slice_layer(i: int, row: dict) -> None:
        prune_attention(adapter, i, row["heads"], row["kv_heads"])
        prune_mlp(adapter, i, row["channels"])

    if compensation is not None and compensation.inputs == "pruned":
        assert compensation.batches is not None
        compensate.sequential(
            adapter,
            compensation.batches,
            kept,
            compensation.mode,
            compensation.ridge,
            slice_layer,
            desc=f"compensation ({compensation.mode}, block by block)",
        )
        drop_blocks(adapter, kept["dropped_blocks"])
        compensate.finish(adapter, compensation.mode)
    else:
        updates = None
        if compensation is not None:  # on the dense weights, before slicing
            assert compensation.stats is not None
            updates = compensate.solve(adapter, kept, compensation.stats, compensation.mode, compensation.ridge)
        drop_blocks(adapter, kept["dropped_blocks"])
        for new_idx, row in enumerate(kept["layers"]):
            slice_layer(new_idx, row)
        if compensation is not None and updates is not None:
            compensate.apply(adapter, kept, updates, compensation.mode)
    rewrite_config(adapter)
    return {**kept, "added_parameters": compensate.added_parameters(adapter, had_bias)}


def _summaries(scores, kept: dict) -> list[LayerImportance]:
    """Per original layer: score mass kept and the spread of scores, for heads and MLP channels."""
    out = []
    by_layer = {row["layer"]: row for row in kept["layers"]}
    for i in range(scores.heads.shape[0]):
        row = LayerImportance(layer=i, dropped=i in kept["dropped_blocks"])
        if scores.blocks is not None:
            row.scores["block_score"] = float(scores.blocks[i])
        for name, vals, key in (("heads", scores.heads[i], "heads"), ("channels", scores.channels[i], "channels")):
            total = float(vals.sum())
            row.scores[f"{name}_score_mean"] = float(vals.mean())
            row.scores[f"{name}_score_max"] = float(vals.max())
            if i in by_layer:
                kept_sum = float(vals[by_layer[i][key]].sum())
                row.scores[f"{name}_kept_score_fraction"] = kept_sum / total if total else None
        out.append(row)
    return out


_VERIFY = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
folder, probe, result, dtype, device = sys.argv[1:6]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
ids = load_file(probe)["input_ids"].to(device)
with torch.no_grad():
    logits = model(input_ids=ids).logits.float().cpu()
    prompt = ids[:1, : min(ids.shape[1], 12)]
    # The KV-cache check runs in float32 (bf16 weights upcast exactly): in bf16, cached and uncached attention
    # round differently (logits ~5 % apart on SmolLM2) and greedy tokens can part on a near-tie, which says
    # nothing about the sliced shapes this check is for.
    model = model.float()
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True,
                            min_new_tokens=8, pad_token_id=model.generation_config.pad_token_id or 0)
    uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False,
                              min_new_tokens=8, pad_token_id=model.generation_config.pad_token_id or 0)
save_file({"logits": logits.contiguous()}, result)
cfg = model.config.get_text_config()
print(json.dumps({"new_tokens": int(cached.shape[1] - prompt.shape[1]),
                  "cache_matches_no_cache": bool(torch.equal(cached, uncached)),
                  "architecture": type(model).__name__,
                  "shapes": [cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
                             cfg.head_dim, cfg.intermediate_size]}))
"""


def verify_saved(
    folder: Path, input_ids: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype, device: str
) -> dict:
    """Reload `folder` with stock transformers in a fresh process; compare logits (in `dtype`) and greedy
    generation with and without the KV cache (in float32: bf16 rounding alone can make them part).

    The process dies with ours (a `kill -9` of finescope must not leave it running), and temp folders of killed
    earlier runs (their owner pid is in the name) are removed here, since those runs could not.
    """
    from safetensors.torch import load_file, save_file

    from ..child_process import die_with_parent, owned_prefix, remove_stale

    remove_stale("finescope-verify")
    with tempfile.TemporaryDirectory(prefix=owned_prefix("finescope-verify")) as tmp:
        probe, result = Path(tmp) / "probe.safetensors", Path(tmp) / "logits.safetensors"
        save_file({"input_ids": input_ids.contiguous().cpu()}, probe)
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
        proc = subprocess.run(
            die_with_parent(
                [
                    sys.executable,
                    "-c",
                    _VERIFY,
                    str(folder),
                    str(probe),
                    str(result),
                    str(dtype).replace("torch.", ""),
                    device,
                ]
            ),
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
            raise PruneError(f"{folder}: the saved model does not reload with stock transformers: {tail[0]}")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        got = load_file(result)["logits"]
    diff = float((got - expected.float().cpu()).abs().max())
    scale = float(expected.float().abs().max()) or 1.0
    tol = (1e-4 if dtype == torch.float32 else 2e-2) * max(1.0, scale)
    info.update({"max_abs_logit_diff": diff, "tolerance": tol, "logits_match": diff <= tol})
    if not info["logits_match"]:
        raise PruneError(
            f"{folder}: reloaded logits differ from the pruned model's by {diff:.3g} (tolerance {tol:.3g})"
        )
    if info["new_tokens"] <= 0 or not info["cache_matches_no_cache"]:
        raise PruneError(f"{folder}: generation after reload is broken ({info})")
    return info


def run(cfg: PruneConfig, out: Path) -> Path:
    """Prune `cfg.model` to `cfg.ratio` with importance computed on `cfg.data`; write the stage folder `out`."""
    out = Path(out)
    start = time.perf_counter()
    if stage_protocol.is_done(out, cfg):
        _log(f"{out}: already done with this config; skipping")
        return out
    if not cfg.data:
        raise PruneError("data: calibration records are required (--data FILE, e.g. runs/<name>/curate/selected.jsonl)")
    if cfg.device == "auto":
        raise PruneError(
            "--device auto: importance takes gradients of every weight and slicing rewrites them, so the model "
            "stays on one device; use cuda, cuda:N or cpu"
        )
    storage.check_stage_folder(out, cfg, overwrite=cfg.overwrite)
    records, added = _calibration_records(cfg)
    handle = distributed.main_first(lambda: load(cfg.model, dtype=cfg.dtype, device=cfg.device), f"loading {cfg.model}")
    before = model_info(handle)
    shapes = model_shapes(handle.adapter, handle.model)
    plan = solve(
        shapes,
        cfg.ratio,
        head_mode=cfg.head_mode,
        attention_ratio=cfg.attention_ratio,
        mlp_ratio=cfg.mlp_ratio,
        mlp_multiple=cfg.mlp_multiple,
        depth=cfg.depth,
    )
    compensate.check_supported(handle.model.config, cfg.compensation)
    batches, calib = calibration_batches(
        handle.tokenizer,
        records,
        samples=cfg.calib_samples,
        length=cfg.calib_length,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        source=str(cfg.data),
        loss_on=cfg.calib_loss,
    )
    calib["added_next_ranked"] = added
    need = compensate.min_tokens_for(plan.intermediate, plan.heads * plan.head_dim, cfg.compensation)
    if calib["tokens"] < need:
        raise PruneError(
            f"compensation={cfg.compensation}: the re-fit needs at least {need:,} calibration tokens (the widest kept "
            f"input, MLP {plan.intermediate} / attention {plan.heads * plan.head_dim}); {cfg.data} gives "
            f"{calib['tokens']:,} within calib_samples={cfg.calib_samples}, calib_length={cfg.calib_length}"
        )
    target = f"{plan.ratio_target:.4f}" if plan.ratio_target is not None else "(explicit shapes)"
    if distributed.ranks().is_main:
        _log(
            f"target {target}, achieved {plan.ratio_achieved:.4f} of total parameters "
            f"({plan.non_embedding_ratio:.4f} of non-embedding); granule {plan.granule:.4f}"
        )
        _log(
            f"shapes: layers {shapes.layers}→{plan.layers}, heads {shapes.heads}→{plan.heads}, "
            f"KV heads {shapes.kv_heads}→{plan.kv_heads}, head_dim {plan.head_dim}, "
            f"MLP {shapes.intermediate}→{plan.intermediate}"
        )
    with stage_protocol.locked_on_rank0(out, cfg) as stage:  # rank 0 writes; the other ranks score
        if stage is None:
            return out
        _prune_into(stage, cfg, handle, plan, batches, calib, before, start)
        return stage


def _prune_into(
    stage: Path, cfg: PruneConfig, handle, plan: PrunePlan, batches, calib: dict, before: dict, start: float
) -> None:
    """Score, slice, save and verify into the (locked) stage folder; DONE last.

    Several ranks: each scores its share of the calibration batches and the sums are all-reduced, so every rank
    holds the same scores; rank 0 alone slices, saves and verifies, the others wait for its outcome."""
    dense_stats = cfg.compensation != "none" and cfg.compensation_inputs == "dense"
    depth_importance = cfg.depth_importance if cfg.depth else None
    # the statistics ride on the importance pass where there is one and every projection's full matrix fits the
    # budget; else they take a pass of their own (kept columns only, in as many passes as the budget needs)
    collector = (
        compensate.Collector(handle.adapter, cfg.compensation)
        if dense_stats
        and runs_a_pass(cfg.importance, depth_importance)
        and compensate.full_bytes(handle.adapter, cfg.compensation) <= cfg.compensation_memory_gib * 2**30
        else None
    )
    t0 = time.perf_counter()
    try:
        scores = compute_scores(
            handle.adapter,
            batches,
            cfg.importance,
            depth_importance=depth_importance,
            seed=cfg.seed,
            desc=f"importance ({cfg.importance})" + (f" + compensation ({cfg.compensation})" if collector else ""),
            on_batch=collector.observe if collector else None,
        )
    finally:
        if collector is not None:
            collector.close()
    t_scores = time.perf_counter() - t0
    t0 = time.perf_counter()
    comp = None
    if cfg.compensation != "none" and cfg.compensation_inputs == "pruned":  # rank 0 alone, block by block
        comp = Compensation(cfg.compensation, cfg.refit_ridge, inputs="pruned", batches=batches)
    elif dense_stats:  # every rank gathers over its share; rank 0 solves while slicing
        kept = plan_kept(handle.adapter, scores, plan, cfg.head_mode)
        if collector is not None:
            stats = collector.stats(kept)
        else:
            stats = compensate.gather(
                handle.adapter,
                batches,
                kept,
                cfg.compensation,
                desc=f"compensation ({cfg.compensation})",
                memory_gib=cfg.compensation_memory_gib,
            )
        comp = Compensation(cfg.compensation, cfg.refit_ridge, stats)
    t_comp = time.perf_counter() - t0
    stage_protocol.finish_on_rank0(
        stage,
        cfg,
        lambda: _slice_save_verify(
            stage, cfg, handle, plan, batches, calib, before, start, scores, (t_scores, t_comp), comp
        ),
        "slicing, saving and verifying on rank 0",
    )


def _calibration_records(cfg: PruneConfig) -> tuple[list[dict], int]:
    """--data's records and, with calib_top_m, the curation's next-ranked pool records after them (those that
    overlap evaluation data left out); the second value counts the added ones."""
    records = list(read_records(cfg.data))
    if not cfg.calib_top_m:
        return records, 0
    ranked = next_ranked(cfg.data, cfg.calib_top_m, {r.get("id") for r in records}, setting="--calib-top-m")
    more = without_eval_overlap(ranked)
    if distributed.ranks().is_main:
        _log(
            f"calibration: {len(records)} records of {cfg.data} + {len(more)} next-ranked pool records "
            f"(calib_top_m={cfg.calib_top_m}; {len(ranked) - len(more)} left out for overlapping evaluation data)"
        )
    return records + more, len(more)


def _slice_save_verify(
    stage: Path,
    cfg: PruneConfig,
    handle,
    plan: PrunePlan,
    batches,
    calib: dict,
    before: dict,
    start,
    scores,
    times: tuple[float, float],
    comp: Compensation | None,
) -> dict:
    """Slice, save, reload and verify, write prune_report.json; return metrics.json's content (rank 0)."""
    t_scores, t_comp = times
    t0 = time.perf_counter()
    sliced = _slice_and_probe(handle, scores, plan, cfg.head_mode, batches, comp)
    t_slice = time.perf_counter() - t0
    t0 = time.perf_counter()
    _save_model(handle, stage / "model")
    t_save = time.perf_counter() - t0
    peak = PeakMemory(
        rss=_peak_rss_mib(), gpu=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    )
    _release_model(handle)  # the reload below runs in a fresh process: free our copy first
    t0 = time.perf_counter()
    verification = Verification(
        **verify_saved(stage / "model", sliced.probe, sliced.expected, dtype=sliced.dtype, device=sliced.device)
    )
    t_verify = time.perf_counter() - t0
    _log(
        f"verified: stock reload logits match (max diff {verification.max_abs_logit_diff:.2e}), "
        f"generate works with and without cache"
    )
    timings = PruneTimings(
        importance_s=t_scores,
        slice_s=t_slice,
        save_s=t_save,
        verify_s=t_verify,
        total_s=time.perf_counter() - start,
        compensate_s=t_comp,
    )
    report = _report(cfg, plan, calib, before, sliced, scores, timings, peak, verification)
    if comp is not None:
        report.compensation = PruneCompensation(
            mode=comp.mode,
            ridge=comp.ridge,
            inputs=comp.inputs,
            tokens=calib["tokens"],
            added_parameters=sliced.kept["added_parameters"],
        )
    report.write(stage / PruneReport.FILE)
    return _metrics(report).to_json()


@dataclass
class _Sliced:
    """The pruned model's bookkeeping once sliced: what was kept, its counts, and the logits a reload must match."""

    kept: dict
    after: dict
    probe: torch.Tensor
    expected: torch.Tensor
    device: str
    dtype: torch.dtype


def _slice_and_probe(
    handle, scores, plan: PrunePlan, head_mode: str, batches, comp: Compensation | None = None
) -> _Sliced:
    """Prune in place, check the parameter count against the plan, and record the probe logits."""
    kept = prune_model(handle, scores, plan, head_mode, comp)
    after = model_info(handle)
    if after["parameters"] != plan.params_after + kept["added_parameters"]:
        raise PruneError(
            f"internal: pruned model has {after['parameters']} parameters, the plan said {plan.params_after}"
            f" + {kept['added_parameters']} compensation biases"
        )
    model = handle.model
    device = str(next(model.parameters()).device)
    dtype = next(model.parameters()).dtype
    probe = batches[0]["input_ids"][:2, :64]
    probe = probe[:, : max(2, int(batches[0]["attention_mask"][:2, :64].sum(1).min()))]
    with torch.no_grad():
        expected = model(input_ids=probe.to(device)).logits.float().cpu()
    return _Sliced(kept=kept, after=after, probe=probe, expected=expected, device=device, dtype=dtype)


def _save_model(handle, model_dir: Path) -> None:
    """Stock `save_pretrained` of model and tokenizer, renamed into place only when complete."""
    with storage.atomic_dir(model_dir) as tmp:
        handle.model.save_pretrained(tmp)
        handle.tokenizer.save_pretrained(tmp)


def _release_model(handle) -> None:
    """Drop the handle's references to the model (the adapter holds it too) and give its GPU memory back."""
    handle.model = handle.adapter = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_SHAPE_KEYS = ("layers", "attention_heads", "kv_heads", "head_dim", "mlp_width")


def _report(
    cfg: PruneConfig,
    plan: PrunePlan,
    calib: dict,
    before: dict,
    sliced: _Sliced,
    scores,
    timings: PruneTimings,
    peak: PeakMemory,
    verification: Verification,
) -> PruneReport:
    after = sliced.after
    params = ParameterCounts(
        before=before["parameters"],
        after=after["parameters"],
        non_embedding_before=before["non_embedding_parameters"],
        non_embedding_after=after["non_embedding_parameters"],
        ratio=1 - after["parameters"] / before["parameters"],
        non_embedding_ratio=1 - after["non_embedding_parameters"] / before["non_embedding_parameters"],
    )
    return PruneReport(
        model=before["source"],
        family=before["family"],
        architecture=before["architecture"],
        data=str(cfg.data),
        calibration=Calibration(**calib),
        importance=cfg.importance,
        head_mode=cfg.head_mode,
        depth_importance=cfg.depth_importance if cfg.depth else None,
        calibration_loss=scores.loss,
        plan=plan,
        parameters=params,
        shapes_before=ModelShapes(**{k: before[k] for k in _SHAPE_KEYS}),
        shapes_after=ModelShapes(**{k: after[k] for k in _SHAPE_KEYS}),
        dropped_blocks=sliced.kept["dropped_blocks"],
        kept=[KeptLayer(**row) for row in sliced.kept["layers"]],
        importance_summary=_summaries(scores, sliced.kept),
        wall_time=timings,
        peak_memory_mib=peak,
        verification=verification,
        notes=[
            "every layer is pruned to the same shape (no skipped layers), so the config stays standard",
            "importance is computed once on the dense model; blocks and widths are then cut together",
        ],
    )


def _metrics(report: PruneReport) -> PruneMetrics:
    return PruneMetrics(
        parameters=report.parameters,
        ratio_target=report.plan.ratio_target,
        ratio_achieved=report.plan.ratio_achieved,
        shapes_after=report.shapes_after,
        calibration_records=report.calibration.records,
        calibration_loss=report.calibration_loss,
        wall_time_s=report.wall_time.total_s,
        peak_rss_mib=report.peak_memory_mib.rss,
        verified=True,
    )
