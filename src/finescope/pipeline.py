"""`finescope run`: curate → prune → recover → eval → report in one run directory, plus the experiment matrix.

    finescope run                                   # the embedded default (configs/default.yaml), runs/default/
    finescope run --config quick                    # a packaged preset (src/finescope/configs/quick.yaml)
    finescope run --config my.yaml --run-dir runs/x curate.top_m=200 variants=dense,pruned,pruned_tgd

Each variant (a row of the paper's tables, see VARIANTS) is a chain of stage configs derived from the pipeline
config. A stage folder is named after what it is plus the hash of its config,
`<run>/<stage>/<label>-<hash8>/`, so identical stage configs are computed once and shared by every variant
that needs them (one curation, one dense evaluation, …), and each stage's own DONE marker makes a rerun skip
what is finished. An interrupted stage keeps its folder and resumes or restarts there on the next run.

`<run>/pipeline.json` lists every variant's stage folders; `finescope.report` reads it and the stage folders.
Only this module and cli.py use the stages (through the registry in stages.py); the stages talk to each other
through files only.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
import typing
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import TypeGuard

from . import FinescopeError, __version__, distributed, storage
from .artifacts import PipelineManifest, VariantEntry
from .config import (
    FINESCOPE_METHODS,
    KD_SETTINGS,
    RANKED_CALIBRATION,
    SAE_SETTINGS,
    CurateConfig,
    PipelineConfig,
    PruneConfig,
    RecoverConfig,
    Selector,
    preset_dir,
    preset_names,
    to_dict,
)
from .registry import SELECTION_METHODS
from .stages import STAGES
from .variants import VARIANTS


class PipelineError(FinescopeError):
    """The pipeline config cannot be turned into stage configs."""


def _is_method(name: str) -> bool:
    return name in SELECTION_METHODS


def _is_selector(name: str) -> TypeGuard[Selector]:
    return name in typing.get_args(Selector)


@dataclass
class Job:
    """One stage run: its config and the folder it writes."""

    stage: str
    cfg: object
    folder: Path
    label: str
    round: int = 0
    """Iterative pruning's step that first needs this job (0 for one-shot chains): jobs run round by round."""


def _folder(run_dir: Path, stage: str, label: str, cfg) -> Path:
    return run_dir / stage / f"{label}-{storage.config_hash(cfg)[:8]}"


def run_dir_of(cfg: PipelineConfig, run_dir: str | Path | None = None) -> Path:
    return Path(run_dir if run_dir is not None else Path(cfg.runs_dir) / cfg.name).expanduser().resolve()


def _log(msg: str) -> None:
    if distributed.ranks().is_main:
        print(f"run: {msg}", file=sys.stderr, flush=True)


# ================================================================================================ planning


class Planner:
    """Derives every stage config of every variant; identical configs map to one Job (one folder)."""

    def __init__(self, cfg: PipelineConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.jobs: dict[tuple[str, str], Job] = {}

    def _job(self, stage: str, label: str, cfg, round: int = 0) -> Job:
        """The job of this stage config; the first label given to a config names its folder."""
        key = (stage, storage.config_hash(cfg))
        if key not in self.jobs:
            self.jobs[key] = Job(stage, cfg, _folder(self.run_dir, stage, label, cfg), label, round)
        elif round < self.jobs[key].round:  # its inputs are the same, so it can run in the earlier round
            self.jobs[key].round = round
        return self.jobs[key]

    def curate(self, data: str) -> Job:
        base = replace(self.cfg.curate, model=self.cfg.model)
        if data == "sae":  # FineScope's own curation: curate.method, sae (the paper's) or hybrid (the default preset's)
            method = base.method if base.method in FINESCOPE_METHODS else "sae"
            return self._job("curate", f"{method}-{base.selector}", replace(base, method=method))
        if data.startswith("sae:"):
            selector = data.split(":", 1)[1]
            if _is_selector(selector):
                return self._job("curate", f"sae-{selector}", replace(base, method="sae", selector=selector))
        elif _is_method(data):  # "embedding", "dsir", "random" or "full" ("sae" is handled above)
            # Fields only the SAE method reads (config.SAE_SETTINGS) are reset, so e.g. changing sae_steps keeps the
            # baselines; `device` is kept (where the user put the model; hash-excluded). The random
            # subset has top_m records: the SAE selection's size under global selection (the paper's "same size").
            fresh = CurateConfig()
            keep = {f.name: getattr(base, f.name) for f in fields(base) if f.name not in (*SAE_SETTINGS, "method")}
            return self._job("curate", data, replace(fresh, method=data, **keep))
        raise PipelineError(f"unknown data source {data!r}")

    def generic_data(self) -> Path:
        spec = self.cfg.generic_calibration
        if spec != "default":
            return Path(spec).expanduser().resolve()
        return self.run_dir / "data" / "generic.jsonl"

    def prune(
        self,
        data: Path,
        calib: str,
        ratio: float | None = None,
        model: str | None = None,
        step: str = "",
        round: int = 0,
    ) -> Job:
        pc = replace(self.cfg.prune, model=model or self.cfg.model, data=str(data))
        if calib == "generic":  # a text list, not a curation: no ranking to extend it from
            plain = PruneConfig()
            pc = replace(pc, **{k: getattr(plain, k) for k in RANKED_CALIBRATION})
        if ratio is not None:
            pc = replace(pc, ratio=ratio)
        return self._job("prune", f"{calib}-{step or f'r{pc.ratio:g}'}", pc, round)

    def recover(self, student: str, data: Path, mode: str, label: str, share: float = 1.0, round: int = 0) -> Job:
        rc = replace(
            self.cfg.recover,
            student=student,
            data=str(data),
            no_teacher=mode == "sft",
            teacher=self.cfg.model if mode in ("tgd", "kd") else "",
        )
        if mode != "kd":  # the KD settings are the kd variants' recipe; TGD / SFT recover without them
            plain = RecoverConfig()
            rc = replace(rc, **{k: getattr(plain, k) for k in KD_SETTINGS})
        elif self.cfg.kd_epochs is not None:
            rc = replace(rc, epochs=self.cfg.kd_epochs)
        if share != 1.0:  # one step of iterative pruning: its share of the recovery's epochs
            rc = replace(rc, epochs=rc.epochs * share)
        return self._job("recover", f"{label}-{mode}", rc, round)

    def evaluate(self, model: str, label: str, tasks: list[str] | None = None, round: int = 0) -> Job:
        ec = replace(self.cfg.eval, model=model, tasks=list(tasks) if tasks else list(self.cfg.eval.tasks))
        return self._job("eval", label, ec, round)

    def dense_folder(self) -> str:
        from .modeling import resolve_model_path

        path = resolve_model_path(self.cfg.model)
        if not Path(path).is_dir():
            raise PipelineError(
                f"model {self.cfg.model!r}: dense_curated fine-tunes the dense model and needs a local "
                "folder (a hub id is not one); download it first"
            )
        return path


def plan(cfg: PipelineConfig, run_dir: Path) -> tuple[Planner, dict[str, dict]]:
    """Every variant's chain of jobs, in run order. Jobs of a chain are dicts stage → Job (eval last)."""
    if not cfg.variants and not cfg.sweep_ratios:
        raise PipelineError("variants: nothing to run (give at least one variant, e.g. variants=dense,pruned_tgd)")
    p = Planner(cfg, run_dir)
    chains: dict[str, dict] = {}
    for name in dict.fromkeys(cfg.variants):
        spec = VARIANTS[name]
        chain: dict[str, Job] = {}
        model = cfg.model
        data: Path | None = None
        if spec.data is not None:
            chain["curate"] = p.curate(spec.data)
            data = chain["curate"].folder / "selected.jsonl"
        steps = cfg.prune_schedule if spec.prune is not None and spec.recovery is not None else []
        k = max(len(steps), 1)
        if spec.prune is not None:
            calib = data if spec.prune == "data" else p.generic_data()
            assert calib is not None, f"VARIANTS[{name!r}]: calibration on the variant's data, but it has none"
            calib_label = chain["curate"].label if spec.prune == "data" else "generic"
            if k > 1:
                model = _prune_steps(p, chain, name, calib, calib_label, data, steps)
                chain["prune"] = p.prune(
                    calib, calib_label, _step_ratio(steps, k - 1), model, f"s{k}of{k}-r{steps[-1]:g}", round=k - 1
                )
            else:
                chain["prune"] = p.prune(calib, calib_label)
            model = str(chain["prune"].folder / "model")
        if spec.recovery is not None:
            student = model if spec.prune is not None else p.dense_folder()
            student_label = chain["prune"].label if spec.prune is not None else "dense"
            data_label = chain["curate"].label
            assert data is not None, f"VARIANTS[{name!r}]: recovery needs the variant's data"
            label = student_label if student_label.startswith(data_label) else f"{student_label}-{data_label}"
            chain["recover"] = p.recover(student, data, spec.recovery, label, 1 / k, round=k - 1)
            model = str(chain["recover"].folder / "model")
        chain["eval"] = p.evaluate(model, name, round=k - 1)
        chains[name] = chain
    if cfg.sweep_ratios:
        nll = [t for t in cfg.eval.tasks if t.startswith("nll:")] or list(cfg.eval.tasks)
        cur = p.curate("sae")
        for r in sorted(set(cfg.sweep_ratios) | {cfg.prune.ratio}):
            pj = p.prune(cur.folder / "selected.jsonl", cur.label, ratio=r)
            chains[f"sweep@{r:g}"] = {
                "curate": cur,
                "prune": pj,
                "eval": p.evaluate(str(pj.folder / "model"), f"sweep-r{r:g}", nll),
            }
        chains["sweep@0"] = {"eval": p.evaluate(cfg.model, "sweep-r0", nll)}
    return p, chains


def _step_ratio(steps: list[float], i: int) -> float:
    """Step i's prune ratio of its input model, for the cumulative shares `steps` of the dense model's parameters:
    the dense model's (steps[i] - steps[i-1]) out of the (1 - steps[i-1]) that step i starts from."""
    before = steps[i - 1] if i else 0.0
    return round((steps[i] - before) / (1 - before), 12)


def _prune_steps(
    p: Planner, chain: dict[str, Job], name: str, calib: Path, calib_label: str, data: Path | None, steps: list[float]
) -> str:
    """Iterative pruning's steps before the last: prune, then recover with 1/k of the variant's epochs, each step
    on the model the one before recovered (`chain["prune@i"]`, `chain["recover@i"]`); returns the last of them."""
    spec, k, model = VARIANTS[name], len(steps), p.cfg.model
    assert data is not None and spec.recovery is not None, f"VARIANTS[{name!r}]: iterative pruning needs a recovery"
    for i in range(k - 1):
        pj = p.prune(calib, calib_label, _step_ratio(steps, i), model, f"s{i + 1}of{k}-r{steps[i]:g}", round=i)
        label = pj.label if pj.label.startswith(chain["curate"].label) else f"{pj.label}-{chain['curate'].label}"
        rj = p.recover(str(pj.folder / "model"), data, spec.recovery, label, 1 / k, round=i)
        chain[f"prune@{i + 1}"], chain[f"recover@{i + 1}"] = pj, rj
        model = str(rj.folder / "model")
    return model


# ================================================================================================ running


def _stage_fn(stage: str):
    """The stage's `run(cfg, out)`, looked up at call time (tests replace it)."""
    return STAGES[stage].entry()


def _write_generic(path: Path, seed: int) -> None:
    if path.is_file():
        return
    from .corpora import default_reference_texts

    texts = default_reference_texts()
    random.Random(seed).shuffle(texts)
    storage.write_jsonl_atomic(path, ({"text": t, "source": "generic"} for t in texts))


# Written first into every run directory: what tells a run directory from a user's folder that merely holds a
# pipeline.yaml (run directories of earlier versions are known by their pipeline.json).
RUN_MARKER = ".finescope-run"


def check_run_dir(root: Path) -> None:
    """Refuse a run directory that is a file, cannot be written, or is a non-empty folder not written by us."""
    storage.check_output_target(root, what="--run-dir")
    if root.exists() and not root.is_dir():
        raise PipelineError(f"{root}: --run-dir exists and is a file, not a folder")
    if (
        root.is_dir()
        and any(root.iterdir())
        and not ((root / RUN_MARKER).is_file() or (root / "pipeline.json").is_file())
    ):
        raise PipelineError(
            f"{root}: exists and is not a finescope run directory; choose a new or empty --run-dir "
            "(nothing in it was touched)"
        )


def process_limit(cfg: PipelineConfig) -> tuple[int, str]:
    """How many ranks this machine holds, and what of: the visible GPUs on a GPU machine (unless the stages are
    put on the CPU), else the CPU cores this process may run on (`os.sched_getaffinity`, which a container's or
    taskset's limit narrows)."""
    import os

    devices = {getattr(getattr(cfg, s), "device", None) for s in ("curate", "prune", "recover", "eval")}
    if torch_cuda_count() > 0 and devices != {"cpu"}:
        return torch_cuda_count(), "visible GPUs"
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return cores, "CPU cores"


def torch_cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_num_processes(cfg: PipelineConfig, oversubscribe: bool = False) -> None:
    """Refuse, before anything starts, more ranks than the machine holds (each rank loads its own model copy: 999
    ranks on 2 cores exhaust memory and take the machine down) unless `oversubscribe` (--oversubscribe)."""
    if cfg.num_processes <= 1 or oversubscribe or distributed.launched_world() > 1:
        return
    limit, what = process_limit(cfg)
    if cfg.num_processes > limit:
        raise PipelineError(
            f"num_processes (--num-processes) = {cfg.num_processes}: this machine has {limit} {what} for the ranks; "
            f"give at most {limit}, or pass --oversubscribe to start them anyway"
        )


def run(cfg: PipelineConfig, run_dir: str | Path | None = None, *, oversubscribe: bool = False) -> Path:
    """Run every variant's stages into the run directory; write pipeline.json and the report; return the run dir.

    The run directory is locked for the whole run: a second `finescope run` on it is refused.

    Launched with several ranks (torchrun / accelerate launch), every rank walks the same plan and takes part in
    each stage; rank 0 holds the lock and writes the run directory's own files. `num_processes` > 1 without a
    launcher: relaunch this run under torchrun (`launch`)."""
    root = run_dir_of(cfg, run_dir)
    check_num_processes(cfg, oversubscribe)
    check_run_dir(root)
    _, chains = plan(cfg, root)
    if any("recover" in chain for chain in chains.values()):
        from .recover.trainer import check_launch_engine

        check_launch_engine()  # FSDP / ZeRO-3 refused now, not after hours of curate, prune and rewrites
    several = cfg.num_processes > 1 or distributed.launched_world() > 1
    if several and "vllm" in (cfg.recover.generation_backend, cfg.eval.generation_backend):
        raise PipelineError(
            "generation_backend vllm with several processes: vLLM's engine cannot run inside a torchrun / "
            "accelerate launch rank; run with one process (vLLM batches on the GPU itself) or use transformers"
        )
    if cfg.num_processes > 1 and distributed.ranks().world == 1:
        return launch(cfg, root)
    with contextlib.ExitStack() as held:

        def lock() -> None:
            held.enter_context(storage.exclusive(root, "run directory"))
            check_run_dir(root)
            root.mkdir(parents=True, exist_ok=True)
            storage.write_json_atomic(root / RUN_MARKER, {"finescope": __version__})

        distributed.on_main(lock, f"locking {root}")
        return _run_locked(cfg, root, chains)


RANK_ERRORS_ENV = "FINESCOPE_RANK_ERRORS"
"""File where each rank of `launch` appends its one-line error, for the launcher's own last line."""
LAUNCH_DIR = "finescope-launch"
"""Prefix of the launcher's temporary folder (`/tmp/finescope-launch-<pid>-<pidns>-…`)."""


def launch(cfg: PipelineConfig, root: Path) -> Path:
    """Run this pipeline as `cfg.num_processes` ranks on this machine: `python -m torch.distributed.run
    --standalone --nproc-per-node N -m finescope run` with the same config (written to a temporary file).
    The ranks' output goes to this process's stderr; a failed rank is a PipelineError naming the exit status and
    the ranks' first error line. The ranks die with this process, even killed with SIGKILL (`watch_launcher`),
    and a launch folder that a killed launcher left in the temp dir is removed by the next launch."""
    import os
    import subprocess
    import tempfile

    from .child_process import LAUNCHER_ENV, die_with_parent, owned_prefix, remove_stale
    from .config import to_yaml

    n = cfg.num_processes
    remove_stale(LAUNCH_DIR)  # the launch folders of launchers killed earlier (kill -9 runs no cleanup)
    with tempfile.TemporaryDirectory(prefix=owned_prefix(LAUNCH_DIR)) as tmp:
        config = Path(tmp) / "pipeline.yaml"
        config.write_text(to_yaml(cfg), encoding="utf-8")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
        cmd += ["-m", "finescope", "run", "--config", str(config), "--run-dir", str(root)]
        _log(f"launching {n} processes: torchrun --standalone --nproc-per-node={n} -m finescope run …")
        errors_file = Path(tmp) / "errors.txt"  # each failing rank appends its one error line (cli.main)
        env = {**os.environ, LAUNCHER_ENV: str(os.getpid()), RANK_ERRORS_ENV: str(errors_file)}
        code = subprocess.run(die_with_parent(cmd), env=env).returncode  # ranks die with us (watch_launcher)
        errors = errors_file.read_text(encoding="utf-8", errors="replace").splitlines() if errors_file.is_file() else []
    if code != 0:
        # torchrun ends with its own traceback: our error comes after it, the last thing the user reads.
        errors = [e for e in errors if not e.startswith("rank ")] or errors  # the cause before its echoes
        cause = f": {errors[0]}" if errors else "; the ranks' errors are above"
        raise PipelineError(f"the {n}-process run of {root} failed (exit status {code}){cause}")
    return root


def _note_other_config(previous: Path, name: str) -> None:
    """Say so when the run directory was last run with another named config: `--config` (default: `default`)
    picks the config, not the directory's pipeline.yaml, and a rerun without it silently runs other stages."""
    import yaml

    try:
        before = yaml.safe_load(previous.read_text(encoding="utf-8")) if previous.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return
    last = before.get("name") if isinstance(before, dict) else None
    if isinstance(last, str) and last != name:
        _log(
            f"{previous.parent}: last run with config {last!r}, this run uses {name!r} "
            "(the config comes from --config, not from the run directory)"
        )


def _run_locked(cfg: PipelineConfig, root: Path, chains: dict[str, dict]) -> Path:
    main = distributed.ranks().is_main
    if main:
        _note_other_config(root / "pipeline.yaml", cfg.name)
        storage.write_atomic(root / "pipeline.yaml", _yaml(cfg))
    manifest_path = root / "pipeline.json"
    seconds = dict(PipelineManifest.read(manifest_path).stage_seconds) if manifest_path.is_file() else {}
    status: dict[str, str] = {}
    started = time.perf_counter()
    order = [j for chain in chains.values() for j in chain.values()]
    # round by round (iterative pruning's steps after the one-shot chains), stage by stage within a round
    order = list({j.folder: j for j in sorted(order, key=lambda j: (j.round, _STAGE_ORDER[j.stage]))}.values())
    for i, job in enumerate(order, 1):
        key = str(job.folder.relative_to(root))
        if storage.is_done(job.folder, job.cfg):
            status[key] = "done"
            _log(f"[{i}/{len(order)}] {key}: done, skipped")
            continue
        if job.stage == "prune" and Path(job.cfg.data).parent == root / "data":
            data = Path(job.cfg.data)
            distributed.on_main(partial(_write_generic, data, cfg.prune.seed), f"writing {data}")
        _log(f"[{i}/{len(order)}] {key}: running {job.stage}")
        t = time.perf_counter()
        _stage_fn(job.stage)(job.cfg, job.folder)
        seconds[key] = round(time.perf_counter() - t, 2)
        status[key] = "ran"
        _log(f"[{i}/{len(order)}] {key}: finished in {seconds[key]:.0f} s")
        if main:
            _write_manifest(manifest_path, cfg, root, chains, seconds, status, time.perf_counter() - started)
    if not main:
        return root
    _write_manifest(manifest_path, cfg, root, chains, seconds, status, time.perf_counter() - started)
    if cfg.report:
        from .report.run import write_report

        html = write_report(root)
        _log(f"report: {html}")
    return root


# Curations first (random/full/embedding do not depend on each other), then every prune, recover, eval:
# a failure in a late stage never blocks the cheaper shared outputs of the others.
_STAGE_ORDER = {name: i for i, name in enumerate(STAGES)}


def _write_manifest(path: Path, cfg, root: Path, chains, seconds, status, wall: float) -> None:
    def entry(name: str, chain: dict) -> VariantEntry:
        stages = {s: str(j.folder.relative_to(root)) for s, j in chain.items()}
        if name not in VARIANTS:  # a point of the pruning-ratio sweep
            return VariantEntry(
                label=name, description="pruning-ratio sweep", data="sae", prune="data", recovery=None, stages=stages
            )
        v = VARIANTS[name]
        steps = sum(s.startswith("prune") for s in chain)
        label = v.label if steps == 1 or not v.prune else f"{v.label}, pruned in {steps} steps"
        return VariantEntry(
            label=label, description=v.description, data=v.data, prune=v.prune, recovery=v.recovery, stages=stages
        )

    PipelineManifest(
        name=cfg.name,
        model=cfg.model,
        config=to_dict(cfg),
        variants={name: entry(name, chain) for name, chain in chains.items()},
        stage_seconds=seconds,
        last_run_status=status,
        last_run_wall_s=round(wall, 2),
    ).write(path)


def _yaml(cfg: PipelineConfig) -> str:
    from .config import to_yaml

    return to_yaml(cfg)


def load_manifest(run_dir: str | Path) -> PipelineManifest:
    path = Path(run_dir) / PipelineManifest.FILE
    if not path.is_file():
        raise PipelineError(f"{run_dir}: not a run directory (no pipeline.json); run `finescope run` first")
    return PipelineManifest.read(path)


# ================================================================================================ presets


def resolve_config(spec: str | None) -> Path:
    """`--config`: a YAML path, or the name of a packaged preset (default, quick, code, …)."""
    spec = spec or "default"
    path = Path(spec).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists() or "/" in spec:
        return path
    preset = preset_dir() / f"{spec}.yaml"
    if not preset.is_file():
        known = ", ".join(preset_names())
        raise PipelineError(f"--config {spec}: no such file or preset; presets: {known}")
    return preset
