"""Prune stage on tiny random models of every family: structures, importance, solver, slicing, save/reload, CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import CORPUS, build_model
from finescope.config import PruneConfig
from finescope.modeling import ArchAdapter, ModelError
from finescope.prune.importance import (
    WIDTH_IMPORTANCE,
    CalibrationError,
    calibration_batches,
    compute_scores,
    select_attention,
)
from finescope.prune.run import PruneError, prune_model, run
from finescope.prune.solver import SolverError, solve
from finescope.prune.structure import Shapes, count_after, drop_blocks, model_shapes


def _batches(tokenizer, n=8, length=48, batch_size=4):
    recs = [{"id": str(i), "instruction": f"Tell me {i}.", "response": t} for i, t in enumerate(CORPUS[:n])]
    return calibration_batches(tokenizer, recs, samples=n, length=length, batch_size=batch_size, seed=0)[0]


def _probe(tokenizer):
    return tokenizer(["What is 12 times 7? The answer is", "The court held that"], return_tensors="pt", padding=True)[
        "input_ids"
    ][:, :8]


def _mask_removed(model, kept: dict) -> None:
    """Zero what pruning removes: o_proj columns of dropped heads, down_proj columns of dropped channels, and
    both of a dropped block (a block whose residual branches output zero is the identity)."""
    a = ArchAdapter(model)
    d = a.head_dim
    kept_by_layer = {row["layer"]: row for row in kept["layers"]}
    with torch.no_grad():
        for i in range(a.num_layers):
            o, down = a.attention(i).o_proj.weight, a.mlp(i).down_proj.weight
            if i not in kept_by_layer:
                o.zero_()
                down.zero_()
                continue
            row = kept_by_layer[i]
            for h in range(a.num_heads):
                if h not in row["heads"]:
                    o[:, h * d : (h + 1) * d] = 0
            for j in range(a.intermediate_size):
                if j not in row["channels"]:
                    down[:, j] = 0


# ================================================================================================ slicing


@pytest.mark.parametrize("head_mode,depth", [("query", 0), ("kv_group", 0), ("query", 1)])
def test_sliced_model_equals_masked_dense_model(family, chat_tokenizer, tmp_path, head_mode, depth):
    """Slicing is exact: the pruned model computes what the dense model computes with the removed parts zeroed.
    This pins the GQA mapping (query head → KV head) and the block renumbering."""
    model = build_model(family, len(chat_tokenizer))
    masked = build_model(family, len(chat_tokenizer))
    a = ArchAdapter(model)
    shapes = model_shapes(a, model)
    plan = solve(shapes, 0.3 if depth == 0 else 0.45, head_mode=head_mode, depth=depth, mlp_multiple=8)
    scores = compute_scores(
        a, _batches(chat_tokenizer), "random", seed=3, depth_importance="block_influence" if depth else None
    )

    class H:  # the minimal handle prune_model needs
        pass

    h = H()
    h.model, h.adapter = model, a
    kept = prune_model(h, scores, plan, head_mode)
    assert sum(p.numel() for p in model.parameters()) == plan.params_after
    for row in kept["layers"]:
        assert len(row["heads"]) == plan.heads and len(row["kv_heads"]) == plan.kv_heads
        assert len(row["channels"]) == plan.intermediate
    _mask_removed(masked, kept)
    ids = _probe(chat_tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, masked(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    cfg = again.config
    assert (
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
    ) == (plan.layers, plan.heads, plan.kv_heads, 16, plan.intermediate)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_query_mode_keeps_equal_heads_per_kv_group():
    head_scores = torch.tensor([0.1, 0.9, 0.8, 0.2, 0.5, 0.4, 0.3, 0.7, 0.6])  # 9 heads, 3 KV heads
    heads, kv = select_attention(head_scores, torch.zeros(3), heads=6, kv_heads=3, mode="query")
    assert kv == [0, 1, 2] and heads == [1, 2, 4, 5, 7, 8]
    assert [sum(1 for h in heads if h // 3 == g) for g in range(3)] == [2, 2, 2]
    heads, kv = select_attention(head_scores, torch.tensor([3.0, 1.0, 2.0]), heads=6, kv_heads=2, mode="kv_group")
    assert kv == [0, 2] and heads == [0, 1, 2, 6, 7, 8]


def test_depth_pruning_generates_with_cache(family, chat_tokenizer):
    model = build_model(family, len(chat_tokenizer))
    a = ArchAdapter(model)
    drop_blocks(a, [1])
    assert a.num_layers == 2 and [layer.self_attn.layer_idx for layer in a.layers] == [0, 1]
    if getattr(a.config, "layer_types", None) is not None:
        assert len(a.config.layer_types) == 2
    prompt = _probe(chat_tokenizer)[:1]
    with torch.no_grad():
        cached = model.generate(
            prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0
        )
        plain = model.generate(
            prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0
        )
    assert cached.shape[1] == prompt.shape[1] + 6 and torch.equal(cached, plain)


# ================================================================================================ importance


@pytest.mark.parametrize("importance", [i for i in WIDTH_IMPORTANCE if i != "random"])
def test_zeroed_structures_score_lowest(importance, chat_tokenizer):
    """A head/channel whose weights are zero contributes nothing: every informed score must rank it last."""
    model = build_model("qwen2", len(chat_tokenizer))
    a = ArchAdapter(model)
    d = a.head_dim
    with torch.no_grad():
        attn, mlp = a.attention(1), a.mlp(1)
        attn.q_proj.weight[2 * d : 3 * d] = 0
        attn.q_proj.bias[2 * d : 3 * d] = 0
        attn.o_proj.weight[:, 2 * d : 3 * d] = 0
        mlp.gate_proj.weight[5] = 0
        mlp.up_proj.weight[5] = 0
        mlp.down_proj.weight[:, 5] = 0
    scores = compute_scores(a, _batches(chat_tokenizer), importance)
    assert int(scores.heads[1].argmin()) == 2 and float(scores.heads[1, 2]) == pytest.approx(0, abs=1e-12)
    assert int(scores.channels[1].argmin()) == 5 and float(scores.channels[1, 5]) == pytest.approx(0, abs=1e-12)
    assert torch.all(scores.heads[0] > 0) and torch.all(scores.channels[0] > 0)
    if importance.startswith("taylor"):
        assert scores.loss is not None and scores.loss > 0


def test_taylor_is_first_order_loss_change(chat_tokenizer):
    """taylor = Σ|w·∂L/∂w| over the group, checked against an independent autograd computation for one head."""
    model = build_model("llama", len(chat_tokenizer))
    a = ArchAdapter(model)
    batches = _batches(chat_tokenizer, batch_size=8)
    scores = compute_scores(a, batches, "taylor")
    b = batches[0]
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1))
    q, o = a.attention(2).q_proj.weight, a.attention(2).o_proj.weight
    gq, go = torch.autograd.grad(loss, [q, o])
    d = a.head_dim
    want = (q.detach() * gq)[d : 2 * d].abs().sum() + (o.detach() * go)[:, d : 2 * d].abs().sum()
    assert float(scores.heads[2, 1]) == pytest.approx(float(want), rel=1e-4)


def test_block_scores(chat_tokenizer):
    model = build_model("llama", len(chat_tokenizer))
    a = ArchAdapter(model)
    with torch.no_grad():  # block 1 becomes the identity: influence 0, Taylor 0 on its output projections
        a.attention(1).o_proj.weight.zero_()
        a.mlp(1).down_proj.weight.zero_()
    batches = _batches(chat_tokenizer)
    bi = compute_scores(a, batches, "magnitude", depth_importance="block_influence").blocks
    assert int(bi.argmin()) == 1 and float(bi[1]) == pytest.approx(0, abs=1e-5) and float(bi[0]) > 0
    tb = compute_scores(a, batches, "magnitude", depth_importance="taylor_block").blocks
    assert int(tb.argmin()) == 1 and float(tb[1]) == pytest.approx(0, abs=1e-8) and bool(torch.all(tb[[0, 2]] > 0))


def test_calibration_labels_cover_the_response_only(chat_tokenizer):
    recs = [{"id": "a", "instruction": "Add 2 and 2.", "response": "The answer is 4."}, {"id": "b", "text": "Plain."}]
    batches, info = calibration_batches(
        chat_tokenizer, recs, samples=10, length=64, batch_size=2, seed=0, loss_on="response"
    )
    labels = batches[0]["labels"]
    resp = chat_tokenizer.decode([t for t in labels[0].tolist() if t != -100])
    assert resp.startswith("The answer is 4.") and "Add 2" not in resp
    assert (labels[1][batches[0]["attention_mask"][1].bool()] != -100).all()
    assert info["records"] == 2 and info["skipped"] == 0
    with pytest.raises(CalibrationError, match="no usable calibration text"):
        calibration_batches(chat_tokenizer, recs[:1], samples=10, length=4, batch_size=2, seed=0, loss_on="response")


@pytest.mark.parametrize("importance", ["flap", "wanda_sp", "taylor"])
def test_calibration_batches_group_like_lengths_and_the_scores_do_not_depend_on_it(importance, chat_tokenizer):
    """Records are batched longest first, so little padding is computed; every score is a sum over real tokens, so
    batching them otherwise (short and long together: more padding) gives the same scores."""
    from finescope.tokens import pad_batch, pad_id

    recs = [{"id": str(i), "instruction": f"Item {i}.", "response": " ".join(CORPUS[: 1 + i % 5])} for i in range(8)]
    batches, _ = calibration_batches(chat_tokenizer, recs, samples=8, length=96, batch_size=3, seed=0)
    lengths = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
    assert lengths == sorted(lengths, reverse=True)
    rows = [
        (b["input_ids"][j][: int(m.sum())].tolist(), b["labels"][j][: int(m.sum())].tolist())
        for b in batches
        for j, m in enumerate(b["attention_mask"])
    ]
    mixed = rows[::2] + rows[1::2]  # short and long records in one batch
    pad = pad_id(chat_tokenizer)
    unsorted = [
        pad_batch([ids for ids, _ in mixed[k : k + 3]], pad, labels=[lab for _, lab in mixed[k : k + 3]])
        for k in range(0, 8, 3)
    ]
    assert sum(b["input_ids"].numel() for b in batches) < sum(b["input_ids"].numel() for b in unsorted)
    model = build_model("llama", len(chat_tokenizer))
    a, b = (compute_scores(ArchAdapter(model), x, importance) for x in (batches, unsorted))
    for got, want in ((a.heads, b.heads), (a.channels, b.channels)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-9)


def test_calibration_text_loss_covers_instruction_and_response(chat_tokenizer):
    recs = [{"id": "a", "instruction": "Add 2 and 2.", "response": "The answer is 4."}]
    batches, info = calibration_batches(chat_tokenizer, recs, samples=10, length=64, batch_size=1, seed=0)
    ids, labels = batches[0]["input_ids"][0], batches[0]["labels"][0]
    assert chat_tokenizer.decode(ids.tolist()) == "Add 2 and 2.\n\nThe answer is 4."  # plain text, no template
    assert torch.equal(labels, ids) and info["loss_tokens"] == len(ids) - 1


# ================================================================================================ solver

SMOL = Shapes(
    total=134_515_008,
    embedding=28_311_552,
    layers=30,
    heads=9,
    kv_heads=3,
    head_dim=64,
    intermediate=1536,
    per_query_head=73_728,
    per_kv_head=73_728,
    per_channel=1728,
    per_block=3_540_096,
)


@pytest.mark.parametrize("head_mode", ["query", "kv_group"])
@pytest.mark.parametrize("depth", [0, 3])
def test_solver_hits_targets_within_one_granule(head_mode, depth):
    assert count_after(SMOL, layers=30, heads=9, kv_heads=3, intermediate=1536) == SMOL.total
    for target in [0.05, 0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6]:
        try:
            plan = solve(SMOL, target, head_mode=head_mode, depth=depth)
        except SolverError:
            assert depth and target < 0.1  # only the depth cut alone can overshoot a small target
            continue
        assert abs(plan.ratio_achieved - target) <= plan.granule
        assert plan.intermediate % 8 == 0 and plan.heads % plan.kv_heads == 0
        assert plan.params_after == count_after(
            SMOL, layers=30 - depth, heads=plan.heads, kv_heads=plan.kv_heads, intermediate=plan.intermediate
        )
        assert plan.non_embedding_ratio > plan.ratio_achieved


def test_solver_default_shape_at_35_percent_and_explicit_ratios():
    plan = solve(SMOL, 0.35)
    assert (plan.heads, plan.kv_heads) == (6, 3) and abs(plan.ratio_achieved - 0.35) <= plan.granule / 2 + 1e-9
    plan = solve(SMOL, 0.35, attention_ratio=0.0)
    assert plan.heads == 9 and abs(plan.ratio_achieved - 0.35) <= plan.granule
    plan = solve(SMOL, 0.2, mlp_ratio=0.25)
    assert plan.intermediate == 1152 and plan.heads == 6 and abs(plan.ratio_achieved - 0.2) <= plan.granule
    with pytest.raises(SolverError, match=r"nearest reachable: 0\.2466 \(reachable range 0\.1480…0\.2466\)"):
        solve(SMOL, 0.35, mlp_ratio=0.25)
    plan = solve(SMOL, 0.35, attention_ratio=1 / 3, mlp_ratio=0.5)
    assert (plan.heads, plan.intermediate, plan.ratio_target) == (6, 768, None)


def test_solver_unreachable_names_nearest_ratios():
    with pytest.raises(SolverError, match=r"ratio = 0.9: unreachable .*nearest reachable: 0\.\d+"):
        solve(SMOL, 0.9)
    with pytest.raises(SolverError, match="nothing can be pruned"):
        solve(SMOL, 0.35, attention_ratio=0.0, mlp_ratio=None, mlp_multiple=1536)
    with pytest.raises(SolverError, match="depth = 30"):
        solve(SMOL, 0.35, depth=30)


# ================================================================================================ the stage


@pytest.mark.parametrize("importance", WIDTH_IMPORTANCE)
def test_each_importance_prunes_saves_and_reloads_stock(importance, chat_tokenizer, tmp_path):
    """Every importance on every family: prune → save_pretrained → stock from_pretrained → equal logits."""
    ids = _probe(chat_tokenizer)
    for family in ("llama", "qwen2", "qwen3", "mistral", "gemma3"):
        model = build_model(family, len(chat_tokenizer))
        a = ArchAdapter(model)
        head_mode = "kv_group" if family in ("qwen2", "gemma3") else "query"
        plan = solve(model_shapes(a, model), 0.35, head_mode=head_mode)
        scores = compute_scores(a, _batches(chat_tokenizer), importance)
        h = type("H", (), {})()
        h.model, h.adapter = model, a
        prune_model(h, scores, plan, head_mode)
        with torch.no_grad():
            want = model(input_ids=ids).logits
        model.save_pretrained(tmp_path / family)
        again = AutoModelForCausalLM.from_pretrained(tmp_path / family).eval()
        with torch.no_grad():
            torch.testing.assert_close(again(input_ids=ids).logits, want)
        assert again.config.num_key_value_heads == plan.kv_heads


def test_bad_inputs_are_clear_errors_and_write_nothing(tiny_model_dirs, calib_file, tmp_path, chat_tokenizer):
    model = str(tiny_model_dirs["llama"])
    out = tmp_path / "out"
    long_prompts = tmp_path / "long.jsonl"
    long_prompts.write_text(json.dumps({"instruction": CORPUS[0] * 2, "response": "ok"}) + "\n")
    cases = [
        (PruneConfig(model=model, data=str(calib_file), ratio=0.95), SolverError, "nearest reachable"),
        (PruneConfig(model=model, data=""), PruneError, "data: calibration records are required"),
        (PruneConfig(model=model, data=str(calib_file), device="auto"), PruneError, "--device auto: importance"),
        (PruneConfig(model=model, data=str(tmp_path / "none.jsonl")), Exception, "no such file"),
        (
            PruneConfig(model=model, data=str(long_prompts), calib_length=8, calib_loss="response"),
            CalibrationError,
            "no usable calibration",
        ),
    ]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cases.append((PruneConfig(model=model, data=str(empty)), Exception, "no usable records"))
    for cfg, err, msg in cases:
        with pytest.raises(err, match=msg):
            run(cfg, out)
        assert not out.exists()
    # unsupported architecture; model folder without tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(gpt2)
    with pytest.raises(ModelError, match="unsupported architecture 'gpt2'"):
        run(PruneConfig(model=str(gpt2), data=str(calib_file)), out)
    bare = tmp_path / "bare"
    build_model("llama", len(chat_tokenizer)).save_pretrained(bare)
    with pytest.raises(ModelError, match="no tokenizer"):
        run(PruneConfig(model=str(bare), data=str(calib_file)), out)
    assert not out.exists()


def test_gradient_sums_of_a_bf16_model_are_kept_in_float32():
    """Many small bf16 gradients summed in bf16 lose their tails; the importance sums are float32."""
    from finescope.prune.importance import _accumulate_gradients, _Gathered

    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    gathered = _Gathered()
    for _ in range(300):
        p.grad = torch.full((4,), 1e-3, dtype=torch.bfloat16)  # bf16(1e-3) ≈ 1.0004e-3
        _accumulate_gradients([p], gathered, n=1, total_tokens=1, fisher=False)
    total = gathered.grads[p]
    assert total.dtype == torch.float32 and p.grad is None
    assert torch.allclose(total, torch.full((4,), 300 * float(torch.tensor(1e-3, dtype=torch.bfloat16))))


# ================================================================================================ calib_top_m


def _ranked_pool(n: int = 12) -> list[dict]:
    """Pool records whose instructions (≥ 13 words, each with its own number) tell them apart for decontam."""
    return [
        {
            "id": f"p{i}",
            "instruction": f"Please tell me one more useful thing about item number {i} of this list.",
            "response": CORPUS[i % len(CORPUS)],
        }
        for i in range(n)
    ]


def test_calib_top_m_calibrates_on_the_curations_next_ranked_records(tiny_model_dirs, tmp_path, monkeypatch):
    """The selection (top 3) plus the next-ranked pool records up to 8, one of them left out for sharing a 13-gram
    with evaluation data: 7 calibration records, 4 of them added."""
    from conftest import fake_curation
    from finescope import decontam

    pool = _ranked_pool()
    selected = fake_curation(tmp_path, pool, best=3)
    monkeypatch.setattr(decontam, "eval_ngrams", lambda: frozenset(decontam.ngrams(pool[6]["instruction"])))
    cfg = PruneConfig(model=str(tiny_model_dirs["llama"]), data=str(selected), ratio=0.3, calib_samples=16)
    out = run(replace(cfg, calib_top_m=8), tmp_path / "top8")
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["records"] == 7 and report["calibration"]["added_next_ranked"] == 4
    plain = run(cfg, tmp_path / "plain")  # calib_top_m 0: the data as it is
    assert json.loads((plain / "report.json").read_text())["calibration"]["records"] == 3


def test_calib_top_m_beyond_the_ranking_or_without_a_curation_is_refused_before_any_work(
    tiny_model_dirs, calib_file, tmp_path
):
    from conftest import fake_curation
    from finescope import FinescopeError

    selected = fake_curation(tmp_path, _ranked_pool(), best=3)
    model, out = str(tiny_model_dirs["llama"]), tmp_path / "out"
    with pytest.raises(FinescopeError, match=r"--calib-top-m 13: the curation scored 12 pool records .*at most 12"):
        run(PruneConfig(model=model, data=str(selected), calib_top_m=13), out)
    with pytest.raises(FinescopeError, match="--calib-top-m needs --data from a curate stage folder"):
        run(PruneConfig(model=model, data=str(calib_file), calib_top_m=4), out)
    assert not out.exists()


def test_the_pipeline_checks_calib_top_m_against_the_pool_sample_and_drops_it_for_generic_calibration(tmp_path):
    from finescope import pipeline
    from finescope.config import ConfigError, CurateConfig, PipelineConfig

    def cfg(top_m: int, variants=("dense", "pruned")) -> PipelineConfig:
        return PipelineConfig(
            variants=list(variants), curate=CurateConfig(pool_sample=800), prune=PruneConfig(calib_top_m=top_m)
        )

    with pytest.raises(ConfigError, match=r"prune.calib_top_m = 900: more records than the 800 .* at most 800"):
        cfg(900).check()
    cfg(900, variants=("dense", "pruned_generic")).check()  # generic calibration reads no ranking
    _, chains = pipeline.plan(cfg(256, variants=("pruned", "pruned_generic")), tmp_path)
    assert chains["pruned"]["prune"].cfg.calib_top_m == 256
    assert chains["pruned_generic"]["prune"].cfg.calib_top_m == 0
