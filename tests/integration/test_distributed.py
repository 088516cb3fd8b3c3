"""Data-parallel ranks (torch.distributed, gloo on CPU): the one-process path, 2-process equivalence of the curate
stage under `torchrun -m finescope`, a dying rank and an error on rank 0 (each a one-line error, no hang)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from finescope import distributed, storage
from finescope.config import to_dict
from finescope.curate import embeddings
from finescope.curate import run as curate_run
from test_curate import _cfg
from test_pipeline import tiny_run  # noqa: F401  (a fixture, used by name)
from test_prune import CORPUS

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update({"FINESCOPE_HOME": str(home), "FINESCOPE_PROGRESS": "0", "HF_HUB_OFFLINE": "1", **extra})
    return env


def _torchrun_stage(stage: str, cfg, out: Path, home: Path, rank_marker: str) -> subprocess.CompletedProcess:
    """`finescope <stage>` with `cfg` (as a YAML file beside `out`) on 2 ranks; asserts it succeeded and that rank 1
    did its share (its progress line `rank_marker … [rank 1/2]`)."""
    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    proc = subprocess.run(
        [*TORCHRUN, "-m", "finescope", stage, "--config", str(config), "--out", str(out)],
        env=_env(home, FINESCOPE_PROGRESS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{rank_marker} [rank 1/2]" in proc.stderr
    return proc


def test_one_process_is_rank_zero_of_one_and_collectives_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    r = distributed.ranks()
    assert (r.rank, r.world, r.is_main) == (0, 1, True)
    assert list(r.mine(3)) == [0, 1, 2]
    distributed.barrier()
    t = torch.ones(2)
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.0, 1.0]
    assert distributed.on_main(lambda: 7, "x") == 7 and distributed.main_first(lambda: 8, "y") == 8


def test_rank_split_is_modulo_world_and_covers_everything():
    parts = [list(distributed.Ranks(r, 3).mine(8)) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert list(distributed.Ranks(3, 4).mine(2)) == []  # more ranks than work: nothing, not an error


def test_bad_timeout_and_world_size_are_one_line_errors(monkeypatch):
    monkeypatch.setenv("FINESCOPE_COLLECTIVE_TIMEOUT", "soon")
    with pytest.raises(distributed.DistributedError, match="FINESCOPE_COLLECTIVE_TIMEOUT: 'soon' is not a number"):
        distributed.timeout_s()
    monkeypatch.setenv("FINESCOPE_COLLECTIVE_TIMEOUT", "-1")
    with pytest.raises(distributed.DistributedError, match="must be positive"):
        distributed.timeout_s()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(distributed.DistributedError, match="WORLD_SIZE: 'two' is not an integer"):
        distributed.ranks()


def test_curate_on_two_processes_selects_exactly_what_one_process_selects(tiny_model_dirs, tmp_path, cache_home):
    cfg = _cfg(tiny_model_dirs, tmp_path, sae_data="pool+reference", batch_size=2)  # 21 batches: 2 shards
    one = curate_run.run(cfg, tmp_path / "one")
    two_home = tmp_path / "home-two"  # a cold cache: the 2-process run computes everything itself
    _torchrun_stage("curate", cfg, tmp_path / "two", two_home, "harvest pool (layer 2)")
    two = tmp_path / "two"
    assert storage.is_done(two, cfg)
    assert (two / "selected.jsonl").read_text() == (one / "selected.jsonl").read_text()
    assert pq.read_table(two / "scores.parquet").equals(pq.read_table(one / "scores.parquet"))
    # Both ranks wrote pool shards into the shared cache; each shard once.
    caches = list(two_home.glob("cache/curate/pool-acts-*"))
    assert len(caches) == 1 and len(list(caches[0].glob("shard-*.safetensors"))) == 2
    metrics = json.loads((two / "metrics.json").read_text())
    assert (
        metrics["sae"]["layer2"]["pool_tokens"]
        == json.loads((one / "metrics.json").read_text())["sae"]["layer2"]["pool_tokens"]
    )


TINY_ENCODER = """
import sys
from functools import partial
import finescope.curate.embeddings as embeddings
from finescope.curate.baselines import MiniLM

embeddings.MiniLM = partial(MiniLM, {encoder!r})
embeddings.EMBED_SHARD_TEXTS = 16
from finescope.cli import main
sys.exit(main())
"""


@pytest.mark.parametrize("method", ["embedding", "hybrid"])
def test_sentence_embeddings_are_sharded_over_two_processes_and_select_the_same(
    tiny_model_dirs, tmp_path, cache_home, chat_tokenizer, monkeypatch, method
):
    """The embedding baseline (and hybrid's embedding half) used to run on rank 0 alone: now each rank embeds
    its cache shards (16 texts each here: 3 shards), and the selection is the one-process selection."""
    from functools import partial

    from finescope.curate.baselines import MiniLM
    from test_curate import tiny_sentence_encoder

    enc = tiny_sentence_encoder(tmp_path / "enc", chat_tokenizer)
    monkeypatch.setattr(embeddings, "MiniLM", partial(MiniLM, str(enc)))
    monkeypatch.setattr(embeddings, "EMBED_SHARD_TEXTS", 16)
    cfg = _cfg(tiny_model_dirs, tmp_path, method=method, top_m=6)
    one = curate_run.run(cfg, tmp_path / "one")
    home, two = tmp_path / "home-two", tmp_path / "two"
    config = two.with_suffix(".yaml")
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    job = _script(tmp_path, TINY_ENCODER.format(encoder=str(enc)))
    proc = subprocess.run(
        [*TORCHRUN, str(job), "curate", "--config", str(config), "--out", str(two)],
        env=_env(home, FINESCOPE_PROGRESS="1"), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "embed pool (all-MiniLM-L6-v2) [rank 1/2]" in proc.stderr
    assert (two / "selected.jsonl").read_text() == (one / "selected.jsonl").read_text()
    assert pq.read_table(two / "scores.parquet").equals(pq.read_table(one / "scores.parquet"))
    caches = list(home.glob("cache/curate/emb-*"))
    assert len(caches) == 1 and len(list(caches[0].glob("shard-*.safetensors"))) == 3


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_a_dead_rank_makes_the_others_exit_with_a_clear_error(tmp_path):
    """Deterministic on a loaded machine: both ranks first join and pass a barrier (a generous timeout covers
    slow starts), rank 1 dies only once rank 0 has left that barrier (a file says so), and rank 0's next barrier
    then fails on the closed connection, not on a timer."""
    passed = tmp_path / "rank0-passed"
    job = _script(
        tmp_path,
        f"""
        import os, sys, time
        from pathlib import Path
        from finescope import distributed
        r = distributed.ranks()
        distributed.barrier("start")
        if r.rank == 1:
            while not Path({str(passed)!r}).exists():
                time.sleep(0.05)
            os._exit(0)  # dies without a word before the collective
        Path({str(passed)!r}).write_text("yes")
        try:
            distributed.barrier("pool encoding")
        except distributed.DistributedError as e:
            print("ERR", e, file=sys.stderr)
            sys.exit(3)
        """,
    )
    # How long the survivors take to give up is benchmarks/dead_rank.py's figure; a hang fails here by the timeout.
    proc = subprocess.run(
        [*TORCHRUN, str(job)],
        env=_env(tmp_path, FINESCOPE_COLLECTIVE_TIMEOUT="900"),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode != 0
    assert "ERR rank 0/2: pool encoding failed" in proc.stderr and "another rank died or hangs" in proc.stderr


def test_an_error_on_rank_zero_reaches_every_rank(tmp_path):
    job = _script(
        tmp_path,
        """
        import sys
        from finescope import FinescopeError, distributed
        r = distributed.ranks()
        def open_stage():
            raise FinescopeError("runs/x/curate: locked by another process")
        try:
            distributed.on_main(open_stage, "opening runs/x/curate")
        except FinescopeError as e:
            print(f"rank {r.rank}: {e}", file=sys.stderr)
            sys.exit(2)
        """,
    )
    proc = subprocess.run(
        [*TORCHRUN, str(job)], env=_env(tmp_path, FINESCOPE_COLLECTIVE_TIMEOUT="60"), capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "rank 0: runs/x/curate: locked by another process" in proc.stderr
    assert "rank 1: rank 0 failed during opening runs/x/curate: runs/x/curate: locked" in proc.stderr


@pytest.mark.parametrize(
    "importance,depth_importance,compensation",
    [("taylor_mix", "taylor_block", "none"), ("flap", "block_influence", "bias_refit")],
)
def test_prune_on_two_processes_scores_like_one_process_and_makes_the_same_plan(
    importance,
    depth_importance,
    compensation,
    tiny_model_dirs,
    tmp_path,
):
    from finescope.config import PruneConfig
    from finescope.prune.run import run as prune_run

    calib_file = tmp_path / "calib.jsonl"
    calib_file.write_text(
        "".join(json.dumps({"instruction": f"Item {i}?", "response": t}) + "\n" for i, t in enumerate(CORPUS))
    )
    cfg = PruneConfig(
        model=str(tiny_model_dirs["llama"]),
        data=str(calib_file),
        ratio=0.4,
        depth=1,
        importance=importance,
        depth_importance=depth_importance,
        compensation=compensation,  # its statistics are gathered per rank and summed
        batch_size=2,  # several batches, split over the ranks
    )
    one = prune_run(cfg, tmp_path / "one")
    # bias_refit: the statistics ride on the importance pass (compensate.Collector), and the pass says so
    marker = f"importance ({importance})" + (f" + compensation ({compensation})" if compensation != "none" else "")
    _torchrun_stage("prune", cfg, tmp_path / "two", tmp_path / "home", marker)
    a = json.loads((one / "report.json").read_text())
    b = json.loads((tmp_path / "two" / "report.json").read_text())
    assert a["kept"] == b["kept"] and a["dropped_blocks"] == b["dropped_blocks"]  # the same plan
    if a["calibration_loss"] is None:  # activation importances take no loss
        assert b["calibration_loss"] is None
    else:
        assert b["calibration_loss"] == pytest.approx(a["calibration_loss"], rel=1e-5)
    for la, lb in zip(
        a["importance_summary"], b["importance_summary"]
    ):  # per-layer score summaries equal within float tolerance
        for key, value in la.items():
            if isinstance(value, float):
                assert lb[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (la["layer"], key)
    assert b["verification"]["logits_match"]
    if compensation != "none":  # the compensated weights and biases agree too
        from safetensors.torch import load_file

        wa, wb = (
            load_file(one / "model" / "model.safetensors"),
            load_file(tmp_path / "two" / "model" / "model.safetensors"),
        )
        assert wa.keys() == wb.keys() and any(k.endswith("down_proj.bias") for k in wa)
        for key in wa:
            torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-5)


def test_eval_on_two_processes_gives_the_results_of_one_process(tiny_model_dirs, tmp_path):
    from finescope.config import EvalConfig
    from finescope.evaluate.run import run as eval_run

    fix = Path(__file__).parents[1] / "fixtures" / "eval"
    cfg = EvalConfig(
        model=str(tiny_model_dirs["llama"]),
        tasks=[
            f"nll:{fix / 'nll_small.jsonl'}",
            f"math:{fix / 'math_small.jsonl'}",
            f"mbpp:{fix / 'mbpp_small.jsonl'}",
            f"answers:{fix / 'answers_small.jsonl'}",
        ],
        allow_code_execution=True,
        max_new_tokens=8,
        batch_size=2,  # 2-3 batches per task, split over the ranks
        write_samples=True,
        device="cpu",
    )
    one = eval_run(cfg, tmp_path / "one").parent
    _torchrun_stage("eval", cfg, tmp_path / "two", tmp_path / "home", "")
    two = tmp_path / "two"
    assert storage.is_done(two, cfg)

    def results(folder: Path) -> list[dict]:
        return [
            {k: v for k, v in r.items() if k != "wall_s"}
            for r in json.loads((folder / "results.json").read_text())["results"]
        ]

    assert results(two) == results(one)
    names = sorted(p.name for p in (one / "samples").glob("*.jsonl"))
    assert names and names == sorted(p.name for p in (two / "samples").glob("*.jsonl"))
    for name in names:
        assert (two / "samples" / name).read_text() == (one / "samples" / name).read_text(), name


def test_recover_on_two_processes_rewrites_and_trains_like_one_process(tiny_model_dirs, tmp_path, monkeypatch):
    """Rewrites split over 2 ranks, LoRA trained data-parallel (Trainer, DDP on gloo) with the same global batch:
    the same distilled.jsonl, and — with 8 training examples in 2 global batches of 4 and no dropout, so that
    both runs see the same examples in each step — the same per-step losses, held-out losses and merged weights
    up to float summation order."""
    from safetensors.torch import load_file

    from finescope.recover.run import PARTIAL
    from finescope.recover.run import run as recover_run
    from test_recover import RECORDS, write_records
    from test_recover import _cfg as recover_cfg

    again = [
        {**r, "id": r["id"] + "b", "instruction": r["instruction"] + " Again."} for r in RECORDS if "instruction" in r
    ]
    data = write_records(tmp_path / "data.jsonl", RECORDS + again)  # 10 to rewrite: 3 batches of 4
    cfg = recover_cfg(
        tiny_model_dirs["llama"],
        tiny_model_dirs["llama"],
        data,
        lora_alpha=8.0,  # as YAML reads it
        lora_dropout=0.0,
        eval_fraction=0.28,  # 3 of 11 held out: 8 to train
        epochs=2.0,
    )
    monkeypatch.setenv("FINESCOPE_HOME", str(tmp_path / "home-one"))  # each run its own teacher-answer cache
    one = recover_run(cfg, tmp_path / "one")
    _torchrun_stage("recover", cfg, tmp_path / "two", tmp_path / "home", "teacher rewrite")
    two = tmp_path / "two"
    assert storage.is_done(two, cfg)
    assert (two / "distilled.jsonl").read_text() == (one / "distilled.jsonl").read_text()
    assert storage.read_json(two / "metrics.json")["rewrite"]["generated"] == 10
    # again on two ranks: rank 0 reads the answers the first two-rank run cached and hands them to rank 1
    _torchrun_stage("recover", cfg, tmp_path / "three", tmp_path / "home", "fine-tune")
    three = storage.read_json(tmp_path / "three" / "metrics.json")["rewrite"]
    assert (three["from_cache"], three["generated"]) == (10, 0)
    assert (tmp_path / "three" / "distilled.jsonl").read_text() == (one / "distilled.jsonl").read_text()
    assert not list(two.glob(PARTIAL.replace(".jsonl", "*")))  # rank files removed once distilled.jsonl is written
    h1, h2 = (storage.read_json(d / "metrics.json")["train"] for d in (one, two))
    assert h1["train_examples"] == 8 and h1["effective_batch"] == h2["effective_batch"] == 4
    assert (h1["micro_batch_size"], h1["grad_accumulation"]) == (2, 2)
    assert (h2["micro_batch_size"], h2["grad_accumulation"]) == (2, 1)  # per rank: 2 ranks x 1 x 2 = 4
    assert [p["step"] for p in h2["train_loss"]] == [1, 2, 3, 4]
    for p, q in zip(h1["train_loss"], h2["train_loss"]):
        assert p["loss"] == pytest.approx(q["loss"], rel=1e-5) and p["lr"] == pytest.approx(q["lr"])
    for p, q in zip(h1["eval_loss"], h2["eval_loss"], strict=True):
        assert p["loss"] == pytest.approx(q["loss"], rel=1e-5)
    a, b = load_file(str(one / "model" / "model.safetensors")), load_file(str(two / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_recover_with_on_policy_answers_trains_on_two_processes(tiny_model_dirs, tmp_path):
    """On-policy distillation under DDP: each rank's collator answers its own examples with its copy of the student
    (adapters included), the teacher's top-k of them computed there; the stage ends and counts rank 0's answers."""
    from test_recover import _cfg as recover_cfg
    from test_recover import write_records

    data = write_records(tmp_path / "data.jsonl")
    cfg = recover_cfg(
        tiny_model_dirs["llama"], tiny_model_dirs["qwen2"], data,
        kd_weight=0.5, kd_top_k=8, kd_cache=str(tmp_path / "kd"), on_policy=1.0, on_policy_temperature=0.0, epochs=2.0,
    )  # fmt: skip
    _torchrun_stage("recover", cfg, tmp_path / "two", tmp_path / "home", "fine-tune")
    metrics = storage.read_json(tmp_path / "two" / "metrics.json")
    assert metrics["kd"]["on_policy"]["answers"] > 0 and all(p["kd"] > 0 for p in metrics["train"]["train_loss"])


def test_rewrites_of_a_killed_two_rank_run_resume_in_one_process(tmp_path, chat_tokenizer):
    from finescope.recover.rewrite import read_partial, rewrite_records
    from test_recover import RECORDS, build_model

    model = build_model("llama", len(chat_tokenizer))
    fresh, _ = rewrite_records(model, chat_tokenizer, RECORDS, max_new_tokens=4, batch_size=2)
    partial = tmp_path / "rewrites.partial.jsonl"
    # What two ranks left behind: rank 0 finished r1, rank 1 finished r2 and was killed while writing r4.
    (tmp_path / "rewrites.partial.rank0.jsonl").write_text(json.dumps(fresh["r1"]) + "\n")
    (tmp_path / "rewrites.partial.rank1.jsonl").write_text(json.dumps(fresh["r2"]) + '\n{"id": "r4", "rew')
    assert set(read_partial(partial)) == {"r1", "r2"}
    rows, stats = rewrite_records(model, chat_tokenizer, RECORDS, max_new_tokens=4, batch_size=2, partial_path=partial)
    assert stats["resumed"] == 2 and stats["generated"] == 3
    assert {k: v["rewrite"] for k, v in rows.items()} == {k: v["rewrite"] for k, v in fresh.items()}
    assert set(read_partial(partial)) == set(fresh)


def test_finescope_run_with_two_processes_equals_one_process(tiny_run, tmp_path):  # noqa: F811
    """`finescope run --num-processes 2` relaunches itself under torchrun; the run equals the one-process run."""
    cfg = yaml.safe_load(tiny_run.read_text())
    cfg["variants"] = ["dense", "pruned", "pruned_tgd"]
    cfg["report"] = False
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = _env(tmp_path / "home", FINESCOPE_PROGRESS="1")
    runs = {}
    for n in (1, 2):
        run_dir = tmp_path / f"run{n}"
        cmd = [sys.executable, "-m", "finescope", "run", "--config", str(path), "--run-dir", str(run_dir)]
        proc = subprocess.run([*cmd, "--num-processes", str(n)], env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[n] = run_dir
    assert "[rank 1/2]" in proc.stderr and "launching 2 processes" in proc.stderr
    one, two = runs[1], runs[2]

    def pairs(pattern: str) -> list[tuple[Path, Path]]:
        """Matching files of the two runs; stage folders are <label>-<config hash> and the hash holds the run's
        own paths, so they pair by label."""

        def by_label(root: Path) -> dict[str, Path]:
            return {p.parent.name.rsplit("-", 1)[0] + "/" + p.name: p for p in root.glob(pattern)}

        a, b = by_label(one), by_label(two)
        assert a and a.keys() == b.keys(), (sorted(a), sorted(b))
        return [(a[k], b[k]) for k in sorted(a)]

    for a, b in pairs("curate/*/selected.jsonl"):
        assert a.read_text() == b.read_text()
    for a, b in pairs("prune/*/report.json"):
        assert json.loads(a.read_text())["kept"] == json.loads(b.read_text())["kept"]
    for a, b in pairs("recover/*/distilled.jsonl"):
        assert a.read_text() == b.read_text()
    evals = pairs("eval/*/results.json")
    assert len(evals) == 3
    for a, b in evals:
        va, vb = ([r["value"] for r in json.loads(x.read_text())["results"]] for x in (a, b))
        assert va == pytest.approx(vb, rel=1e-5), a
    assert json.loads((two / "pipeline.json").read_text())["config"]["num_processes"] == 2


def test_device_auto_is_refused_under_several_ranks_and_for_training(tiny_model_dirs, tmp_path, monkeypatch):
    from finescope.config import RecoverConfig
    from finescope.modeling import ModelError, load
    from finescope.recover.run import RecoverError
    from finescope.recover.run import run as recover_run

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        ModelError, match="device 'auto' spreads one model over every GPU, but this process is one of 2"
    ):
        load(tiny_model_dirs["llama"], device="auto")
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = RecoverConfig(student=str(tiny_model_dirs["llama"]), data=str(tmp_path / "x.jsonl"), device="auto")
    with pytest.raises(RecoverError, match="--device auto: the student trains"):
        recover_run(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_recover_loads_student_and_teacher_with_its_dtype_and_device(tiny_model_dirs, tmp_path, monkeypatch):
    from finescope.recover import run as recover_mod
    from test_recover import RECORDS, write_records
    from test_recover import _cfg as recover_cfg

    seen = []

    class Stop(Exception):
        pass

    def spy(spec, **kw):
        seen.append(kw)
        if len(seen) == 2:  # student, then teacher: enough
            raise Stop
        return real(spec, **kw)

    real = recover_mod.load
    monkeypatch.setattr(recover_mod, "load", spy)
    data = write_records(tmp_path / "data.jsonl", RECORDS)
    cfg = recover_cfg(tiny_model_dirs["llama"], tiny_model_dirs["llama"], data, dtype="float32", device="cpu")
    with pytest.raises(Stop):
        recover_mod.run(cfg, tmp_path / "out")
    assert seen == [{"dtype": "float32", "device": "cpu"}] * 2


KILL_AT_STEP = """
import sys
from transformers import TrainerCallback
import finescope.recover.run as recover_run

class KillAtStep(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == {step}:
            raise SystemExit(9)  # killed between optimiser steps, after checkpoint-{step} was written

plain = recover_run.fine_tune
recover_run.fine_tune = lambda *a, **kw: plain(*a, **kw, callbacks=[KillAtStep()])
from finescope.cli import main
sys.exit(main())
"""


@pytest.mark.parametrize("killed_on,resumed_on", [(2, 1), (1, 2)])
def test_fine_tuning_killed_on_one_process_count_resumes_on_another(tiny_model_dirs, tmp_path, killed_on, resumed_on):
    """Trainer checkpoints count steps of the global batch, which does not depend on the process count: a
    recover stage killed after step 2 of 4 on N ranks resumes on M ranks at step 3 and ends with the losses and
    merged weights of an uninterrupted one-process run (no dropout, so no per-rank random state matters)."""
    from safetensors.torch import load_file

    from finescope.recover.run import CHECKPOINTS
    from finescope.recover.run import run as recover_run
    from test_recover import RECORDS, write_records
    from test_recover import _cfg as recover_cfg

    again = [
        {**r, "id": r["id"] + "b", "instruction": r["instruction"] + " Again."} for r in RECORDS if "instruction" in r
    ]
    data = write_records(tmp_path / "data.jsonl", RECORDS + again)
    base = dict(lora_alpha=8.0, lora_dropout=0.0, eval_fraction=0.28, epochs=2.0, no_rewrite=True)
    cfg = recover_cfg(tiny_model_dirs["llama"], tiny_model_dirs["llama"], data, **base, checkpoint_steps=1)
    whole = recover_run(recover_cfg(tiny_model_dirs["llama"], tiny_model_dirs["llama"], data, **base), tmp_path / "a")
    out = tmp_path / "b"
    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    job = _script(tmp_path, KILL_AT_STEP.format(step=2))
    launch = [*TORCHRUN[:-1], str(killed_on)]
    killed = subprocess.run(
        [*launch, str(job), "recover", "--config", str(config), "--out", str(out)],
        env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert killed.returncode != 0 and not storage.is_done(out, cfg)
    assert sorted(p.name for p in (out / CHECKPOINTS).iterdir()) == ["checkpoint-2"]
    if resumed_on == 1:
        recover_run(cfg, out)
    else:
        _torchrun_stage("recover", cfg, out, tmp_path / "home", "fine-tune")
    assert storage.is_done(out, cfg) and not (out / CHECKPOINTS).exists()
    h1, h2 = (storage.read_json(d / "metrics.json")["train"] for d in (whole, out))
    assert h2["resumed_from_step"] == 2 and [p["step"] for p in h2["train_loss"]] == [3, 4]
    assert [p["loss"] for p in h2["train_loss"]] == pytest.approx([p["loss"] for p in h1["train_loss"][2:]], rel=1e-5)
    assert h2["eval_loss"][-1]["loss"] == pytest.approx(h1["eval_loss"][-1]["loss"], rel=1e-5)
    a, b = load_file(str(whole / "model" / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
