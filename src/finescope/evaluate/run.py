"""`finescope eval`: run benchmark tasks on one model and write a results JSON.

    finescope eval --model default --tasks mmlu:stem,gsm8k,nll:math --limit 50 --out runs/demo/eval/dense
    finescope eval --model runs/demo/prune/model --tasks humaneval --allow-code-execution --out eval/pruned.json

`--out` is either a stage folder (results in `<out>/results.json`, config.json, metrics.json and DONE; a rerun
with the same config is skipped) or, when it ends in `.json`, that results file itself. Per-sample JSONL
(`--write-samples`) goes to `<out>/samples/` or `<stem>.samples/` beside the file.

Each task result: task, variant (scoring), metric, value, stderr, n, chance (the value a random guess gets, for
accuracy metrics: 1/choices for multiple choice, 0 for generation, code and top-1; None for NLL and for the shares
of looping / cut-off replies), wall time, plus task-specific extras (per-subject/type breakdowns, both GSM8K
extractions, perplexity, an `answers:` task's first replies as `examples`). An `nll:` task gives two results from one
scoring pass: `nll` and `top1`; an `answers:` task three from one generation pass: `exact_match` (records with a
reference number), `looping` and `cut_off`. The model is identified by its folder and a hash of its config.json and weight
files' names and sizes.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from .. import distributed, hashing, stage_protocol, storage, vllm_backend
from ..artifacts import EvalMetrics, EvalResults, ModelIdentity, TaskResult
from ..config import EvalConfig
from ..data import format_prompt
from ..generation import generate, is_degenerate
from ..progress import progress
from .answers import extract_gsm8k, extract_math_answer, gsm8k_target, math_equal
from .code_exec import CodeExecutionError, Limits, pass_at_k, run_program
from .mc import Request, mean_stderr, pick, score_requests
from .perplexity import domain_nll
from .tasks import (
    GSM8K_COT_EXEMPLARS,
    GSM8K_STOP,
    HUMANEVAL_STOP,
    LETTERS,
    MATH_STOP,
    MBPP_STOP,
    Task,
    TaskError,
    end_of_turn_stops,
    extract_code,
    gsm8k_prompt,
    humaneval_instruct_program,
    humaneval_instruct_prompt,
    humaneval_program,
    math_prompt,
    mbpp_program,
    mbpp_prompt,
    mmlu_cloze_prompt,
    mmlu_letter_prompt,
    resolve_task,
    select_subset,
    shot_picker,
)

DEFAULT_SHOTS = {"mc": 0, "gsm8k": 8, "code": 0, "math": 0, "nll": 0, "answers": 0}


def prepare_tasks(cfg: EvalConfig) -> list[Task]:
    """Resolve and check every task before any model is loaded: names, code-execution permission, limit, shots."""
    if not cfg.tasks:
        raise TaskError("no tasks given (--tasks mmlu:stem,gsm8k,nll:math …)")
    tasks = [resolve_task(n) for n in cfg.tasks]
    needs = [t.name for t in tasks if t.needs_code_execution]
    if needs and not cfg.allow_code_execution:
        raise CodeExecutionError(
            f"{', '.join(needs)} run model-generated code; pass --allow-code-execution to "
            "allow it (each program runs confined: see finescope/evaluate/code_exec.py)"
        )
    for t in tasks:
        n = len(t.docs())
        flag, limit = ("--answers-limit", cfg.answers_limit) if _answers_limit(cfg, t) else ("--limit", cfg.limit)
        if limit > n:
            raise TaskError(
                f"task {t.name!r} has {n} questions; {flag} {limit} is larger (use a smaller limit, or 0 for all)"
            )
        shots = _shots(cfg, t)
        if t.kind == "gsm8k" and shots > len(GSM8K_COT_EXEMPLARS):
            raise TaskError(
                f"gsm8k has {len(GSM8K_COT_EXEMPLARS)} chain-of-thought exemplars; --shots {shots} is larger"
            )
        if t.kind in ("mc", "math", "code") and t.options.get("flavour") != "humaneval" and shots >= n:
            raise TaskError(f"task {t.name!r}: --shots {shots} needs more than {n} questions")
    return tasks


def _answers_limit(cfg: EvalConfig, task: Task) -> bool:
    """`answers_limit` sets this task's question count (an `answers:` task, with the setting given)."""
    return task.kind == "answers" and cfg.answers_limit > 0


def _shots(cfg: EvalConfig, task: Task) -> int:
    if task.options.get("flavour") == "humaneval":
        return 0  # HumanEval prompts are zero-shot by construction
    return DEFAULT_SHOTS[task.kind] if cfg.shots is None else cfg.shots


# ================================================================================================ task runners


def _result(task: Task, variant: str, metric: str, values: list[float], *, chance: float | None, **extra) -> dict:
    """A result of per-question scores: their mean and its standard error; `chance` is a random guess's value."""
    n = len(values)
    return {
        "task": task.name,
        "variant": variant,
        "metric": metric,
        "value": sum(values) / n if n else float("nan"),
        "stderr": mean_stderr(values),
        "n": n,
        "chance": chance,
        **extra,
    }


def run_mc(task: Task, handle, cfg: EvalConfig, scoring: str) -> tuple[dict, list[dict]]:
    docs = task.docs()
    idx = select_subset(len(docs), cfg.limit)
    shots = _shots(cfg, task)
    picker = shot_picker(docs, "subject", cfg.seed)
    reqs, choices_text = [], []
    for i in idx:
        d = docs[i]
        ex = picker(i, shots)
        if scoring == "letter":
            reqs.append(Request(mmlu_letter_prompt(d, ex), [f" {L}" for L in LETTERS]))
            choices_text.append(list(LETTERS))
        else:
            reqs.append(Request(mmlu_cloze_prompt(d, ex), [f" {c}" for c in d["choices"]]))
            choices_text.append(d["choices"])
    scores = score_requests(
        handle.model, handle.tokenizer, reqs, batch_size=cfg.batch_size, desc=f"{task.name} [{scoring}]", sharded=True
    )
    acc, acc_norm, samples = [], [], []
    by_subject: dict[str, list[float]] = {}
    for i, s, ch in zip(idx, scores, choices_text):
        d = docs[i]
        raw = pick(s, ch, "none")
        norm = pick(s, ch, "chars")
        acc.append(float(raw == d["answer"]))
        acc_norm.append(float(norm == d["answer"]))
        main = acc[-1] if scoring == "letter" else acc_norm[-1]
        by_subject.setdefault(d["subject"], []).append(main)
        samples.append(
            {
                "id": d["id"],
                "subject": d["subject"],
                "answer": d["answer"],
                "pred": raw,
                "pred_norm": norm,
                "logprobs": [x.logprob for x in s],
                "correct": bool(main),
            }
        )
    chance = sum(1 / len(ch) for ch in choices_text) / len(choices_text)
    if scoring == "letter":
        res = _result(task, "letter", "acc", acc, chance=chance, shots=shots)
    else:
        res = _result(
            task,
            "cloze",
            "acc_norm",
            acc_norm,
            chance=chance,
            shots=shots,
            acc=sum(acc) / len(acc),
            acc_stderr=mean_stderr(acc),
        )
    if len(by_subject) > 1:
        res["by_subject"] = {k: {"value": sum(v) / len(v), "n": len(v)} for k, v in sorted(by_subject.items())}
    return res, samples


def _completions(handle, cfg: EvalConfig, prompts: list[str], stop, desc: str, **sampling) -> list[list[str]]:
    """Each prompt's completion texts (one, or `num_samples` when sampling), generated with the eval settings."""
    outs = generate(
        handle.generator or handle.model,
        handle.tokenizer,
        prompts,
        max_new_tokens=cfg.max_new_tokens,
        stop=stop,
        batch_size=cfg.batch_size,
        desc=desc,
        sharded=True,
        **sampling,
    )
    return [[c["text"] for c in comps] for comps in outs]


def run_gsm8k(task: Task, handle, cfg: EvalConfig) -> tuple[dict, list[dict]]:
    docs = task.docs()
    idx = select_subset(len(docs), cfg.limit)
    shots = _shots(cfg, task)
    prompts = [gsm8k_prompt(docs[i]["question"], shots) for i in idx]
    outs = _completions(handle, cfg, prompts, GSM8K_STOP, task.name)
    flex, strict, samples = [], [], []
    for i, out in zip(idx, outs):
        target = gsm8k_target(docs[i]["answer"])
        s, f = extract_gsm8k(out[0])
        flex.append(float(f == target))
        strict.append(float(s == target))
        samples.append(
            {
                "id": docs[i]["id"],
                "target": target,
                "completion": out[0],
                "strict": s,
                "flexible": f,
                "correct": bool(flex[-1]),
            }
        )
    res = _result(
        task,
        f"{shots}-shot cot",
        "exact_match",
        flex,
        chance=0.0,
        shots=shots,
        extraction="last number in the completion (lm-eval flexible-extract)",
        exact_match_strict=sum(strict) / len(strict),
        exact_match_strict_stderr=mean_stderr(strict),
    )
    return res, samples


def run_math(task: Task, handle, cfg: EvalConfig) -> tuple[dict, list[dict]]:
    docs = task.docs()
    idx = select_subset(len(docs), cfg.limit)
    shots = _shots(cfg, task)
    picker = shot_picker(docs, "type", cfg.seed)
    prompts = [math_prompt(docs[i], picker(i, shots)) for i in idx]
    outs = _completions(handle, cfg, prompts, MATH_STOP, task.name)
    acc, samples = [], []
    by_type: dict[str, list[float]] = {}
    for i, out in zip(idx, outs):
        d = docs[i]
        pred = extract_math_answer(out[0])
        ok = math_equal(pred, d["reference"])
        acc.append(float(ok))
        by_type.setdefault(d["type"], []).append(float(ok))
        samples.append(
            {
                "id": d["id"],
                "type": d["type"],
                "reference": d["reference"],
                "pred": pred,
                "completion": out[0],
                "correct": ok,
            }
        )
    res = _result(
        task,
        f"{shots}-shot",
        "acc",
        acc,
        chance=0.0,
        shots=shots,
        by_type={k: {"value": sum(v) / len(v), "n": len(v)} for k, v in sorted(by_type.items())},
    )
    return res, samples


def run_code(task: Task, handle, cfg: EvalConfig) -> tuple[dict, list[dict]]:
    docs = task.docs()
    idx = select_subset(len(docs), cfg.limit)
    humaneval = task.options["flavour"] == "humaneval"
    instruct = bool(task.options.get("instruct"))
    shots = _shots(cfg, task)
    if instruct:
        prompts = [humaneval_instruct_prompt(handle.tokenizer, docs[i]) for i in idx]
        stop = end_of_turn_stops(handle.tokenizer)
    elif humaneval:
        prompts, stop = [docs[i]["prompt"] for i in idx], HUMANEVAL_STOP
    else:
        picker = shot_picker(docs, "__none__", cfg.seed)
        prompts, stop = [mbpp_prompt(docs[i], picker(i, shots)) for i in idx], MBPP_STOP
    n = cfg.num_samples
    temperature = cfg.temperature if n > 1 else 0.0
    outs = _completions(
        handle,
        cfg,
        prompts,
        stop,
        f"{task.name} generate",
        num_samples=n,
        temperature=temperature,
        top_p=0.95,
        seed=cfg.seed,
    )
    limits = Limits(timeout_s=cfg.exec_timeout_s)
    ks = [k for k in (1, 10, 100) if k <= n]
    per_k: dict[int, list[float]] = {k: [] for k in ks}
    samples = []
    ranks = distributed.ranks()
    bar = progress(total=len(ranks.mine(len(idx))), desc=f"{task.name} execute{ranks.tag}", unit="problem")

    def execute(problem: tuple[int, list[str]]) -> list[str]:
        i, comps = problem
        statuses = [run_program(_program(docs[i], comp, humaneval, instruct), limits).status for comp in comps]
        bar.update(1)
        return statuses

    all_statuses = distributed.map_sharded(list(zip(idx, outs)), execute, f"{task.name}: gathering executions")
    bar.close()
    for i, comps, statuses in zip(idx, outs, all_statuses):
        d = docs[i]
        c = statuses.count("passed")
        for k in ks:
            per_k[k].append(pass_at_k(n, c, k))
        sample = {"id": d["id"], "completions": comps, "statuses": statuses, "passed": c}
        if instruct:
            sample["extracted"] = [extract_code(comp) for comp in comps]
        samples.append(sample)
    variant = "greedy" if n == 1 else f"n={n}, T={temperature}"
    res = _result(
        task,
        variant,
        "pass@1",
        per_k[1],
        chance=0.0,
        shots=shots,
        samples_per_problem=n,
        **{f"pass@{k}": sum(v) / len(v) for k, v in per_k.items() if k != 1},
    )
    return res, samples


def _program(doc: dict, completion: str, humaneval: bool, instruct: bool) -> str:
    if instruct:
        return humaneval_instruct_program(doc, completion)
    return humaneval_program(doc, completion) if humaneval else mbpp_program(doc, completion)


def run_nll(task: Task, handle, cfg: EvalConfig) -> list[tuple[dict, list[dict]]]:
    """Two results of one scoring pass: the token-weighted NLL and top-1 accuracy of the response tokens.

    The per-record samples (NLL and top-1 hits) go with the NLL result; the top-1 result has none of its own."""
    docs = task.docs()
    idx = select_subset(len(docs), cfg.limit)
    metrics, samples = domain_nll(
        handle.model, handle.tokenizer, [docs[i] for i in idx], batch_size=cfg.batch_size, desc=task.name, sharded=True
    )
    common = {"task": task.name, "n": len(idx)}
    nll = {
        **common,
        "variant": "response tokens",
        "metric": "nll",
        "value": metrics["nll"],
        "stderr": metrics["nll_stderr"],
        "perplexity": metrics["perplexity"],
        "tokens": metrics["tokens"],
    }
    top1 = {
        **common,
        "variant": "response tokens (top-1)",
        "metric": "top1",
        "value": metrics["top1"],
        "stderr": metrics["top1_stderr"],
        "chance": 0.0,
        "tokens": metrics["tokens"],
        "definition": "fraction of response tokens that are the model's argmax next-token prediction",
    }
    return [(nll, samples), (top1, [])]


ANSWER_EXAMPLES = 3
"""Answers an `answers:` task keeps in its results file (the report shows them beside dense's)."""


def run_answers(task: Task, handle, cfg: EvalConfig) -> list[tuple[dict, list[dict]]]:
    """The model's own greedy replies to the task's instructions (chat template, `max_new_tokens`): the share right
    (records with a `target`: GSM8K's last-number rule), the share that loop (`generation.is_degenerate`) and the
    share cut at the token cap without ending their turn. The first `ANSWER_EXAMPLES` go into the results file."""
    docs = task.docs()
    idx = select_subset(len(docs), cfg.answers_limit if _answers_limit(cfg, task) else cfg.limit)
    tok = handle.tokenizer
    system = [d.get("system") if isinstance(d.get("system"), str) else None for d in (docs[i] for i in idx)]
    prompts = [format_prompt(tok, docs[i]["instruction"], s) for i, s in zip(idx, system)]  # as format_example
    outs = generate(
        handle.generator or handle.model,
        tok,
        prompts,
        max_new_tokens=cfg.max_new_tokens,
        stop=end_of_turn_stops(tok),
        batch_size=cfg.batch_size,
        desc=task.name,
        sharded=True,
    )
    scored = all("target" in docs[i] for i in idx)
    right, loops, cut, samples = [], [], [], []
    for i, comps in zip(idx, outs):
        d, text = docs[i], comps[0]["text"]
        sample = {"id": d["id"], "question": d["instruction"], "reference": d.get("response", ""), "answer": text}
        if scored:
            sample["right"] = extract_gsm8k(text)[1] == d["target"]
            right.append(float(sample["right"]))
        sample["looping"], sample["cut_off"] = is_degenerate(text), bool(comps[0]["cut_off"])
        loops.append(float(sample["looping"]))
        cut.append(float(sample["cut_off"]))
        samples.append(sample)
    variant = f"greedy, chat, {cfg.max_new_tokens} tokens"
    loop = _result(
        task, variant, "looping", loops, chance=None, definition="share of replies caught in a repetition loop"
    )
    capped = _result(
        task, variant, "cut_off", cut, chance=None, definition="share of replies cut at the token cap unfinished"
    )
    first = loop
    out: list[tuple[dict, list[dict]]] = []
    if scored:
        first = _result(task, variant, "exact_match", right, chance=0.0, extraction="last number in the reply")
        out.append((first, samples))
    first["examples"] = samples[:ANSWER_EXAMPLES]
    out += [(loop, [] if scored else samples), (capped, [])]
    return out


def evaluate_task(task: Task, handle, cfg: EvalConfig) -> list[tuple[dict, list[dict]]]:
    """Every result (one per scoring variant and metric) of one task, each with the wall time of the pass that
    computed it (the two results of an `nll:` task share one)."""
    runs: list[Callable[[], list[tuple[dict, list[dict]]]]]
    if task.kind == "mc":
        variants = ["letter", "cloze"] if cfg.mmlu_scoring == "both" else [cfg.mmlu_scoring]
        runs = [partial(_one, run_mc, task, handle, cfg, v) for v in variants]
    elif task.kind == "nll":
        runs = [partial(run_nll, task, handle, cfg)]
    elif task.kind == "answers":
        runs = [partial(run_answers, task, handle, cfg)]
    else:
        runner = {"gsm8k": run_gsm8k, "math": run_math, "code": run_code}[task.kind]
        runs = [partial(_one, runner, task, handle, cfg)]
    out = []
    for fn in runs:
        start = time.perf_counter()
        results = fn()
        wall_s = round(time.perf_counter() - start, 2)
        for res, samples in results:
            res["wall_s"] = wall_s
            out.append((res, samples))
    return out


def _one(runner: Callable[..., tuple[dict, list[dict]]], *args) -> list[tuple[dict, list[dict]]]:
    return [runner(*args)]


# ================================================================================================ stage


def model_identity(handle) -> dict:
    """Where the model came from and a hash of its config.json plus its weight files' names and sizes."""
    src = Path(handle.source)
    return {
        "path": str(src),
        "config_hash": hashing.model_config_hash(handle.source),
        "architecture": type(handle.model).__name__,
        "parameters": sum(p.numel() for p in handle.model.parameters()),
    }


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def run(cfg: EvalConfig, out: Path) -> Path:
    """Evaluate `cfg.model` on `cfg.tasks`; write the results JSON (see module docstring); return its path.

    The output is checked, the tasks resolved and the model loaded before anything is written; the output is
    locked for the whole evaluation."""
    from ..modeling import load, resolve_model_path

    storage.check_output_target(out)
    out = Path(out)
    if out.suffix == ".json":
        if _results_hash(out) == storage.config_hash(cfg):
            return out
        _check_results_file(out, cfg)
    else:
        if stage_protocol.is_done(out, cfg):
            return out / EvalResults.FILE
        storage.check_stage_folder(out, cfg, overwrite=cfg.overwrite)
    tasks = prepare_tasks(cfg)
    if cfg.generation_backend == "vllm":
        vllm_backend.check_available()
    handle = distributed.main_first(lambda: load(cfg.model, dtype=cfg.dtype, device=cfg.device), f"loading {cfg.model}")
    if cfg.generation_backend == "vllm" and any(t.generative for t in tasks):
        handle.generator = vllm_backend.VllmEngine(resolve_model_path(cfg.model), dtype=cfg.dtype, seed=cfg.seed)
    # Several ranks (torchrun / accelerate launch): every rank scores or generates its share of each task's
    # questions (see score_requests, generate), rank 0 holds the lock and writes.
    if out.suffix == ".json":
        with contextlib.ExitStack() as held:

            def open_results_file() -> bool:
                held.enter_context(storage.exclusive(out, "results file"))
                if _results_hash(out) == storage.config_hash(cfg):
                    return False
                _check_results_file(out, cfg)
                _set_aside(out)
                return True

            if distributed.on_main(open_results_file, f"opening {out}"):
                _evaluate_into(out, out.with_name(out.stem + ".samples"), cfg, tasks, handle)
        return out
    with stage_protocol.locked_on_rank0(out, cfg) as stage:
        if stage is None:
            return out / EvalResults.FILE
        _evaluate_into(stage / EvalResults.FILE, stage / "samples", cfg, tasks, handle, done=stage)
    return out / EvalResults.FILE


def _evaluate_into(
    results_path: Path, samples_dir: Path, cfg: EvalConfig, tasks: list[Task], handle, done: Path | None = None
) -> None:
    """Evaluate every task and write the results (and samples); with `done`, mark that stage folder done.
    Several ranks: all evaluate, rank 0 writes, the others wait for it."""
    start = time.perf_counter()
    results, written = [], []
    for task in tasks:
        for res, samples in evaluate_task(task, handle, cfg):
            result = TaskResult.from_json(res, source=f"result of task {task.name}")
            results.append(result)
            if cfg.write_samples and samples:
                written.append((samples_dir / f"{_safe(task.name)}-{_safe(result.variant)}.jsonl", samples))
    report = EvalResults(
        model=ModelIdentity(**model_identity(handle)),
        eval_config_hash=storage.config_hash(cfg),
        config=storage.to_jsonable(cfg),
        results=results,
        wall_s=round(time.perf_counter() - start, 2),
    )

    def write() -> dict | None:
        for path, samples in written:
            storage.write_jsonl_atomic(path, samples)
        report.write(results_path)
        return EvalMetrics.of(report.results).to_json() if done is not None else None

    # `done` None: a results file, not a stage folder (no DONE; its lock and hash are handled by `run`).
    stage_protocol.finish_on_rank0(done, cfg, write, f"writing {results_path} on rank 0")


# A results file is recognised by its own keys; anything else at --out is a user's file and is never replaced.
_MAX_RESULTS_BYTES = 256 * 2**20


def _results_hash(path: Path) -> str | None:
    """The eval config hash of a finescope results file at `path`, "" for another JSON file, None if absent."""
    if not path.exists():
        return None
    if not path.is_file() or path.stat().st_size > _MAX_RESULTS_BYTES:
        return ""
    try:
        data = storage.read_json(path)
    except (OSError, ValueError, RecursionError):
        return ""
    if isinstance(data, dict) and isinstance(data.get("eval_config_hash"), str) and "results" in data:
        return data["eval_config_hash"]
    return ""


def _check_results_file(path: Path, cfg: EvalConfig) -> None:
    if path.exists() and not path.is_file():
        raise storage.StageError(f"{path}: exists and is not a file; give a new .json path or a folder name")
    if _results_hash(path) == "" and not cfg.overwrite:
        raise storage.StageError(
            f"{path}: exists and is not a finescope eval results file; choose another --out or pass "
            "--overwrite (it is then kept aside as <name>.superseded-unknown.json)"
        )


def _set_aside(path: Path) -> None:
    """Keep an earlier results file (and its samples folder) aside as `<stem>.superseded-<hash>`, never deleted."""
    have = _results_hash(path)
    if have is None:
        return
    tag = f"superseded-{have or 'unknown'}"
    stamp = time.strftime("%Y%m%d%H%M%S")
    for old in (path, path.with_name(path.stem + ".samples")):
        if old.exists():
            name = old.with_name(f"{path.stem}.{tag}{'.json' if old == path else '.samples'}")
            if name.exists():
                name = name.with_name(f"{path.stem}.{tag}-{stamp}{'.json' if old == path else '.samples'}")
            old.replace(name)
