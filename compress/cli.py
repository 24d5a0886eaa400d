"""``compress`` command line: argument parsing only; the work is in run/export/measure/report."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from compress.errors import CompressError


def _batch_sizes(text: str) -> List[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError("batch sizes must be positive")
    return sizes


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (a number >= 0), got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds (a number >= 0), got {text}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _workers(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compress", description="Prune vision models while they train.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="run a recipe: prune / distill / finetune stages, evaluate, export")
    f.add_argument("--recipe", type=Path, help="recipe YAML file, or a bundled recipe's name (see: compress recipes)")
    f.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value by dotted path, e.g. stages.0.pruner.target_gmacs_ratio=0.65")
    f.add_argument("--out", type=Path, help="parent folder of the run directory (default runs/<name>)")
    f.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run")

    e = sub.add_parser("eval", help="evaluate an export on a dataset")
    e.add_argument("--checkpoint", type=Path, required=True, help="export folder")
    e.add_argument("--data", required=True, metavar="KIND:ROOT", help="e.g. imagenet:/data/imagenet")
    e.add_argument("--split", default="val")
    e.add_argument("--limit", type=_positive)
    e.add_argument("--batch-size", type=_positive, default=64)
    e.add_argument("--workers", type=_workers, default="auto", help="data loader processes (default: what the machine's CPUs allow, <= 8)")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", type=Path, help="also write the results here")

    b = sub.add_parser("bench", help="dense vs pruned: GMACs, parameters, images/s, latency, memory")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="export folder")
    src.add_argument("--recipe", type=Path, help="recipe file or bundled name: its prune stages zero-shot")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    b.add_argument("--batch-sizes", type=_batch_sizes, default=[1, 32])
    b.add_argument("--repeats", type=_positive, default=10, help="forwards per model and batch size, at least "
                   "(spread over 5 interleaved rounds)")
    b.add_argument("--round-seconds", type=_seconds, default=0.5, help="each model runs at least this long in every "
                   "round (default 0.5; 0: --repeats alone)")
    b.add_argument("--data", metavar="KIND:ROOT", help="measure on val images of this dataset instead of random inputs "
                   "(for pruners whose cost depends on the image, e.g. dtop)")
    b.add_argument("--device", default="auto")
    b.add_argument("--onnx", action="store_true", help="also time dense and pruned exported to ONNX, run by onnxruntime")
    b.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="also time dense and pruned under torch.compile (default backend inductor: about a minute per "
                   "model and batch size on a laptop CPU), checked against eager, with their graph breaks")
    b.add_argument("--json", type=Path)

    x = sub.add_parser("export", help="a run's export folder (again), ONNX or torch.export files, or a Hub upload")
    xsrc = x.add_mutually_exclusive_group(required=True)
    xsrc.add_argument("--run", type=Path, help="run directory")
    xsrc.add_argument("--checkpoint", type=Path, help="export folder")
    x.add_argument("--out", type=Path, help="new folder (--format compress) or file (model.onnx, model.pt2)")
    x.add_argument("--format", choices=["compress", "onnx", "pt2"], default="compress",
                   help="compress: export folder (default); onnx: for onnxruntime/TensorRT; pt2: torch.export program")
    x.add_argument("--static-batch", action="store_true", help="fix the batch size at 2 instead of a dynamic axis")
    x.add_argument("--dense-tokens", action="store_true",
                   help="export a model whose token pruner cannot be traced (dtop) with it detached: every token runs")
    x.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the export folder with a model card to the Hugging Face Hub")
    x.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")

    sub.add_parser("pruners", help="list registered pruners with their parameters and defaults")
    sub.add_parser("recipes", help="list bundled recipes")
    sc = sub.add_parser("schema", help="print the recipe JSON schema (every registered pruner's keys) for an editor")
    sc.add_argument("--out", type=Path, help="write it to this file instead of stdout")
    return p


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def cmd_fit(args) -> int:
    from compress.run import fit

    if (args.recipe is None) == (args.resume is None):
        raise CompressError("fit: give --recipe PATH, or --resume RUN_DIR")
    if args.resume is not None and args.overrides:
        raise CompressError("fit: --set cannot change a run being resumed")
    fit(args.recipe, args.overrides, args.out, args.resume)
    return 0


def _check_json_target(path: Optional[Path]) -> None:
    """``--json`` is written after minutes of work: refuse a target that cannot be written before starting."""
    if path is None:
        return
    if path.is_dir():
        raise CompressError(f"--json: {path} is a folder, not a file name")
    if not path.parent.is_dir():
        raise CompressError(f"--json: folder not found: {path.parent}")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise CompressError(f"--json: cannot write in {path.parent} (permission denied)")


def _write_json(path: Path, results) -> None:
    """Atomically: a temporary file in the same folder, flushed, then renamed over ``path``, so a reader
    or a crash sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(results, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CompressError(f"--json: cannot write {path} ({e.strerror or e})") from None


def cmd_eval(args) -> int:
    from compress import commands

    _check_json_target(args.json)
    results = commands.evaluate_export(args.checkpoint, args.data, args.split, args.limit, args.batch_size,
                                       args.workers, _device(args.device))
    print(commands.eval_table(results))
    if args.json:
        _write_json(args.json, results)
    return 0


def cmd_bench(args) -> int:
    from compress import commands

    _check_json_target(args.json)
    results = commands.bench(args.checkpoint, args.recipe, args.overrides, args.batch_sizes, _device(args.device),
                             args.repeats, data=args.data, onnx=args.onnx, round_seconds=args.round_seconds,
                             compile_backend=args.compile)
    print(commands.bench_table(results))
    if args.json:
        _write_json(args.json, results)
    return 0


def cmd_export(args) -> int:
    from compress import commands

    if args.format != "compress":
        if args.out is None:
            raise CompressError(f"export: --format {args.format} needs --out FILE (e.g. model.{args.format})")
        if args.push_to_hub:
            raise CompressError("export: --push-to-hub uploads the export folder; use it with --format compress")
        for r in commands.deploy(args.run, args.checkpoint, args.out, args.format, not args.static_batch,
                                 args.dense_tokens):
            c = r["check"]
            print(f"wrote {r['file']} ({r['format']}, batch {'dynamic' if r['dynamic_batch'] else 'fixed at 2'}); "
                  f"vs compress.load at batch {c['batch_size']}: max |difference| {c['max_abs_diff']:.2g}")
        return 0
    if args.out is None and not args.push_to_hub:
        raise CompressError("export: give --out DIR (or --push-to-hub ORG/NAME)")
    out, url = commands.export_folder(args.run, args.checkpoint, args.out, args.push_to_hub, args.private)
    if out is not None:
        print(f"exported to {out}")
    if url:
        print(f"pushed to {url}")
    return 0


def cmd_pruners(args) -> int:
    from compress import commands

    print(commands.describe_pruners())
    return 0


def cmd_recipes(args) -> int:
    from compress import commands

    print(commands.describe_recipes())
    return 0


def cmd_schema(args) -> int:
    from compress import files, schema

    text = schema.dumps()
    if args.out is None:
        sys.stdout.write(text)
    else:
        files.write_text(args.out, text)
        print(f"wrote {args.out}")
    return 0


COMMANDS = {"fit": cmd_fit, "eval": cmd_eval, "bench": cmd_bench, "export": cmd_export,
            "pruners": cmd_pruners, "recipes": cmd_recipes, "schema": cmd_schema}


def _os_error(e: OSError) -> str:
    """A file-system failure (no space, read-only, not a folder, ...) as one line naming the file."""
    where = f"{e.filename}: " if e.filename else ""
    return f"cannot write or read {where}{e.strerror or e}" if e.filename else f"{e.strerror or e}"


def _log_warnings() -> None:
    """compress's own warnings as ``[compress] warning: ...`` lines on stderr (once per process)."""
    import logging

    class CurrentStderr(logging.StreamHandler):
        """Writes to ``sys.stderr`` as it is now (tests and tools swap it), not as it was at set-up."""

        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, value):
            pass

    log = logging.getLogger("compress")
    if not log.handlers:
        handler = CurrentStderr()
        handler.setFormatter(logging.Formatter("[compress] %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False


def main(argv: Optional[List[str]] = None) -> int:
    from compress.interrupts import Interrupted

    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("COMPRESS_DEBUG")
    _log_warnings()
    try:
        if args.command in ("fit", "eval", "bench"):
            from compress.measure import pin_threads

            pin_threads()
        return COMMANDS[args.command](args)
    except CompressError as e:
        if debug:
            raise
        print(f"compress {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)  # always one line
        return 2
    except BrokenPipeError:  # `compress recipes | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # disk full, read-only folder, a file where a folder should be: nothing half-written is left
        if debug:
            raise
        print(f"compress {args.command}: error: {_os_error(e)}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:
        stop = e if isinstance(e, Interrupted) else Interrupted(2)
        from compress.context import is_global_zero

        if is_global_zero():  # every rank of a multi-process run stops; the advice is said once
            resume = f"; resume with: compress fit --resume {stop.run_dir}" if getattr(stop, "run_dir", None) else ""
            print(f"compress {args.command}: interrupted by {stop.signal_name}{resume}", file=sys.stderr)
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
