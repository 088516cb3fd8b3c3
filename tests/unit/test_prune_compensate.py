"""Compensation at prune time (prune/compensate.py) on tiny random models: exactness with nothing removed, the
re-fit's reconstruction error, stock reload of a compensated model, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CORPUS, build_model
from finescope.config import PruneConfig
from finescope.modeling import ArchAdapter
from finescope.prune import compensate
from finescope.prune.importance import calibration_batches
from finescope.prune.run import PruneError, run


def _batches(tokenizer, n=24, length=64, batch_size=4):
    recs = [{"id": str(i), "instruction": f"Tell me {i}.", "response": t} for i, t in enumerate(CORPUS[:n])]
    return calibration_batches(tokenizer, recs, samples=n, length=length, batch_size=batch_size, seed=0)[0]


class _Handle:
    def __init__(self, model):
        self.model, self.adapter = model, ArchAdapter(model)


def _all_kept(adapter: ArchAdapter) -> dict:
    return {
        "dropped_blocks": [],
        "layers": [
            {
                "layer": i,
                "heads": list(range(adapter.num_heads)),
                "kv_heads": list(range(adapter.num_kv_heads)),
                "channels": list(range(adapter.intermediate_size)),
            }
            for i in range(adapter.num_layers)
        ],
    }


@pytest.mark.parametrize("inputs", ["dense", "pruned"])
@pytest.mark.parametrize("mode", ["bias", "refit", "bias_refit"])
def test_compensation_with_nothing_removed_leaves_the_logits_unchanged(chat_tokenizer, mode, inputs):
    model = build_model("llama", len(chat_tokenizer))
    h = _Handle(model)
    batches = _batches(chat_tokenizer)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    kept = _all_kept(h.adapter)
    had = compensate.biased(h.adapter)
    if inputs == "dense":
        stats = compensate.gather(h.adapter, batches, kept, mode)
        updates = compensate.solve(h.adapter, kept, stats, mode, ridge=0.5)  # a large ridge changes nothing either
        compensate.apply(h.adapter, kept, updates, mode)
    else:
        compensate.sequential(h.adapter, batches, kept, mode, 0.5, lambda i, row: None, desc="seq")
        compensate.finish(h.adapter, mode)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)
    cfg, a = model.config, h.adapter
    per_layer = (
        2 * a.intermediate_size + 2 * cfg.hidden_size + a.num_heads * a.head_dim + 2 * a.num_kv_heads * a.head_dim
    )
    expected = 0 if mode == "refit" else cfg.num_hidden_layers * per_layer
    assert compensate.added_parameters(a, had) == expected
    assert (cfg.mlp_bias and cfg.attention_bias) == (mode != "refit")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_block_by_block_refit_tracks_the_dense_model_at_least_as_well_as_one_shot(chat_tokenizer, family):
    """The same cut, three ways: plain slicing, one-shot re-fit on the dense inputs, block-by-block re-fit on
    the pruned model's own inputs; the last hidden state's distance to the dense model's, on the calibration
    batches, shrinks in that order. Also runs the block replay of each family (rotary, masks, sliding windows)."""
    from finescope.prune.importance import compute_scores
    from finescope.prune.run import Compensation, plan_kept, prune_model
    from finescope.prune.solver import solve
    from finescope.prune.structure import model_shapes

    batches = _batches(chat_tokenizer)

    def last_hidden(model) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(
                [
                    model(
                        input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True
                    ).hidden_states[-1][b["attention_mask"].bool()]
                    for b in batches
                ]
            )

    dense = build_model(family, len(chat_tokenizer))
    target = last_hidden(dense)
    errors = {}
    for how in ("none", "dense", "pruned"):
        model = build_model(family, len(chat_tokenizer))
        h = _Handle(model)
        plan = solve(model_shapes(h.adapter, model), 0.4, head_mode="query", mlp_multiple=8)
        scores = compute_scores(h.adapter, batches, "magnitude")
        comp = None
        if how == "dense":
            stats = compensate.gather(h.adapter, batches, plan_kept(h.adapter, scores, plan, "query"), "refit")
            comp = Compensation("refit", 0.01, stats)
        elif how == "pruned":
            comp = Compensation("refit", 0.01, inputs="pruned", batches=batches)
        prune_model(h, scores, plan, "query", comp)
        errors[how] = float(((last_hidden(model) - target) ** 2).mean())
    assert errors["pruned"] < errors["dense"] < errors["none"], errors


def _layer_inputs(model, batches, layer: int) -> torch.Tensor:
    """Real-token inputs of one down_proj over the calibration batches."""
    xs = []
    lin = ArchAdapter(model).mlp(layer).down_proj

    def hook(_m, args, mask):
        xs.append(args[0].detach()[mask.bool()])

    for b in batches:
        handle = lin.register_forward_pre_hook(lambda m, args, mask=b["attention_mask"]: hook(m, args, mask))
        with torch.no_grad():
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        handle.remove()
    return torch.cat(xs).double()


def test_the_refit_reduces_the_layers_reconstruction_error_on_its_calibration_data(chat_tokenizer):
    model = build_model("llama", len(chat_tokenizer))
    a = ArchAdapter(model)
    batches = _batches(chat_tokenizer)
    kept = _all_kept(a)
    half = sorted(torch.randperm(a.intermediate_size, generator=torch.Generator().manual_seed(0))[:48].tolist())
    for row in kept["layers"]:
        row["channels"] = half
    x = _layer_inputs(model, batches, 1)
    lin = a.mlp(1).down_proj
    w = lin.weight.detach().double()
    dense = x @ w.T
    k = torch.tensor(half)

    def error(mode: str) -> float:
        stats = compensate.gather(a, batches, kept, mode) if mode != "none" else None
        if stats is None:
            return float(((dense - x[:, k] @ w[:, k].T) ** 2).mean())
        upd = compensate.solve(a, kept, stats, mode, ridge=1e-6)[(1, "down")]
        out = x[:, k] @ upd.weight.T + (upd.bias if upd.bias is not None else 0)
        return float(((dense - out) ** 2).mean())

    plain, bias, refit, both = (error(m) for m in ("none", "bias", "refit", "bias_refit"))
    assert refit < 0.7 * plain and both < 0.7 * plain
    assert bias < plain  # the mean alone already helps
    assert both <= refit * 1.0001  # the intercept can only help the fit on its own data
    assert both <= bias


def test_a_calibration_set_too_small_for_the_refit_is_refused_with_the_minimum(tiny_model_dirs, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text(json.dumps({"text": "a short text"}) + "\n")
    cfg = PruneConfig(model=str(tiny_model_dirs["llama"]), data=str(calib), ratio=0.3, compensation="refit")
    with pytest.raises(PruneError, match=r"the re-fit needs at least \d+ calibration tokens .* gives \d+"):
        run(cfg, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_statistics_in_several_passes_equal_one_pass(chat_tokenizer):
    """A memory budget below the accumulators' size splits the gathering into passes (one group of projections
    each): the sums are the same, bit for bit, and so is the re-fit."""
    from finescope.prune.importance import compute_scores
    from finescope.prune.run import plan_kept
    from finescope.prune.solver import solve
    from finescope.prune.structure import model_shapes

    model = build_model("llama", len(chat_tokenizer))
    h = _Handle(model)
    batches = _batches(chat_tokenizer)
    plan = solve(model_shapes(h.adapter, model), 0.4, head_mode="query", mlp_multiple=8)
    kept = plan_kept(h.adapter, compute_scores(h.adapter, batches, "magnitude"), plan, "query")
    one = compensate.gather(h.adapter, batches, kept, "bias_refit")
    sizes = [v.numel() * 8 + one.cross[k].numel() * 8 for k, v in one.sums.items()]
    assert len(compensate.passes(sizes, max(sizes))) == len(sizes)  # the budget below holds one projection a pass
    many = compensate.gather(h.adapter, batches, kept, "bias_refit", memory_gib=max(sizes) / 2**30)
    assert many.count == one.count and one.sums.keys() == many.sums.keys()
    for key in one.sums:
        assert torch.equal(one.sums[key], many.sums[key]) and torch.equal(one.cross[key], many.cross[key])


def test_passes_group_in_order_within_the_budget():
    assert compensate.passes([3, 3, 3, 5, 1], 6) == [[0, 1], [2], [3, 4]]
    assert compensate.passes([10, 1], 4) == [[0], [1]]  # one projection above the budget still gets its pass
    assert compensate.passes([], 4) == []


@pytest.mark.parametrize("mode", ["bias", "refit", "bias_refit"])
@pytest.mark.parametrize("importance", ["flap", "taylor", "magnitude"])
def test_statistics_gathered_in_the_importance_pass_equal_a_pass_of_their_own(chat_tokenizer, importance, mode):
    """The Collector rides on the importance pass (whatever that pass gathers: activations, gradients, or nothing
    for magnitude): the scores are those of a pass without it, and the statistics of the kept columns are
    gather's up to float32 rounding (Σ x xᵀ then its kept columns, against Σ x x_Kᵀ)."""
    from finescope.prune.importance import compute_scores
    from finescope.prune.run import plan_kept
    from finescope.prune.solver import solve
    from finescope.prune.structure import model_shapes

    model = build_model("llama", len(chat_tokenizer))
    h = _Handle(model)
    batches = _batches(chat_tokenizer)
    plan = solve(model_shapes(h.adapter, model), 0.4, head_mode="query", mlp_multiple=8)
    plain = compute_scores(h.adapter, batches, importance)
    collector = compensate.Collector(h.adapter, mode)
    scores = compute_scores(h.adapter, batches, importance, on_batch=collector.observe)
    collector.close()
    for a, b in ((plain.heads, scores.heads), (plain.kv, scores.kv), (plain.channels, scores.channels)):
        assert torch.equal(a, b)
    kept = plan_kept(h.adapter, scores, plan, "query")
    assert any(len(row["channels"]) < h.adapter.intermediate_size for row in kept["layers"])
    ours, theirs = collector.stats(kept), compensate.gather(h.adapter, batches, kept, mode)
    assert collector.sums == {} and collector.cross == {}  # single use: the full matrices are released
    assert ours.count == theirs.count and ours.sums.keys() == theirs.sums.keys() == ours.cross.keys() | ours.sums.keys()
    assert ours.cross.keys() == (theirs.sums.keys() if compensate.needs_gram(mode) else set())
    for key in theirs.sums:
        torch.testing.assert_close(ours.sums[key], theirs.sums[key], rtol=1e-6, atol=1e-6)
        if compensate.needs_gram(mode):
            assert ours.cross[key].shape == theirs.cross[key].shape
            torch.testing.assert_close(ours.cross[key], theirs.cross[key], rtol=1e-5, atol=1e-5)
    assert collector.handles == [] and not model.model.layers[0].mlp.down_proj._forward_pre_hooks


def test_the_prune_stage_gathers_the_statistics_in_the_importance_pass_where_they_fit(
    tiny_model_dirs, calib_file, tmp_path, capsys
):
    """Within compensation_memory_gib: one pass over the calibration data (its progress line names both); under
    a budget too small for the full matrices: a pass of their own. The two models agree up to float rounding."""
    from safetensors.torch import load_file

    common = dict(model=str(tiny_model_dirs["llama"]), data=str(calib_file), ratio=0.4, batch_size=8)
    common |= dict(importance="flap", compensation="bias_refit")
    run(PruneConfig(**common), tmp_path / "one")
    err = capsys.readouterr().err
    assert "importance (flap) + compensation (bias_refit)" in err and "compensation (bias_refit) pass" not in err
    run(PruneConfig(**common, compensation_memory_gib=1e-6), tmp_path / "two")
    err = capsys.readouterr().err
    assert "importance (flap) + compensation" not in err and "compensation (bias_refit) pass 1/" in err
    a, b = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("one", "two"))
    assert a.keys() == b.keys() and any(k.endswith("down_proj.bias") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    # magnitude scores read the weights only: no pass to ride on, so the statistics take their own (kept columns)
    run(PruneConfig(**{**common, "importance": "magnitude"}), tmp_path / "three")
    err = capsys.readouterr().err
    assert "+ compensation" not in err and "compensation (bias_refit):" in err
