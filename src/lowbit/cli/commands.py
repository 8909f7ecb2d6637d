"""The ``lowbit`` command: argument parsing and dispatch only; the work happens in the library.

User mistakes (an unknown name, a bad recipe, a corrupt checkpoint, missing data) print one
``lowbit: error: ...`` line to stderr and exit 2; anything else is a bug and keeps its traceback.
Heavy imports (torch) happen inside the commands so that ``lowbit --help`` is instant.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2


def cmd_run(args: argparse.Namespace) -> None:
    from lowbit.recipe import load_recipe, run_recipe

    recipe = load_recipe(args.recipe, args.set)
    run_recipe(recipe, data_dir=args.data_dir, resume=args.resume, command=_command(args))


def cmd_compress(args: argparse.Namespace) -> None:
    from lowbit.recipe import load_recipe, run_recipe

    recipe = load_recipe(args.recipe, args.set)
    if not any(call.type == "encode" for call in recipe.stages):
        raise ValueError(f"{args.recipe}: a compression recipe ends in an 'encode' stage (the .lbz file); "
                         "use 'lowbit run' for other recipes")
    run_recipe(recipe, data_dir=args.data_dir, resume=args.resume, command=_command(args))


def cmd_train(args: argparse.Namespace) -> None:
    from lowbit.models import model_entry
    from lowbit.recipe import apply_overrides, run_recipe, validate_recipe

    given = ("epochs", "lr", "batch_size", "optimizer", "weight_decay", "seed")
    stage = {"type": "train", **{k: getattr(args, k) for k in given if getattr(args, k) is not None}}
    data = args.data or model_entry(args.model).dataset
    doc = {"name": f"train-{args.model}", "output": args.out or f"runs/train/{args.model}",
           "model": {"name": args.model}, "data": {"name": data}, "stages": [stage]}
    recipe = validate_recipe(apply_overrides(doc, args.set), source="lowbit train")
    run_recipe(recipe, data_dir=args.data_dir, resume=args.resume, command=_command(args))


def cmd_eval(args: argparse.Namespace) -> None:
    from lowbit.data import load_dataset
    from lowbit.models import model_entry
    from lowbit.recipe.runner import check_fits
    from lowbit.train import evaluate

    model, meta = _load_file(args.checkpoint)
    name = args.data or meta.get("dataset") or model_entry(meta["model"]["name"]).dataset
    data = load_dataset(name, args.data_dir)
    trained_on = f" (it was trained on {meta['dataset']!r})" if meta.get("dataset") not in (None, name) else ""
    check_fits(model, data, f"{args.checkpoint}{trained_on}")
    res = evaluate(model, data.loader("test", args.batch_size), show_progress=True)
    print(f"{args.checkpoint}: {name} test acc {res['acc']:.2f}%  loss {res['loss']:.4f}")


def cmd_summary(args: argparse.Namespace) -> None:
    from lowbit.analysis.summary import print_summary, summary_json
    from lowbit.hw.counts import profile

    model, title, shape = _model_or_checkpoint(args.model)
    try:
        stats = profile(model, input_shape=args.input_shape or shape)
    except RuntimeError as e:  # the forward pass rejected the input: a wrong (or missing) --input-shape
        shape = args.input_shape or shape or "the registered input shape"
        raise ValueError(f"{title} does not accept {shape}; pass --input-shape C,H,W "
                         f"({str(e).strip().splitlines()[0]})") from None
    if args.json:
        print(summary_json(stats))
    else:
        print_summary(stats, title=title)


def cmd_models(args: argparse.Namespace) -> None:
    from lowbit.models import list_models, model_entry

    names = list_models(args.glob)
    if not names:
        raise ValueError(f"no model matches {args.glob!r}; models: {', '.join(list_models())}")
    rows = [(n, "x".join(map(str, model_entry(n).input_shape)), model_entry(n).dataset, model_entry(n).paper)
            for n in names]
    _table(("model", "input", "dataset", "paper"), rows)


def cmd_datasets(args: argparse.Namespace) -> None:
    from lowbit.data import datasets

    _table(("dataset", "description"), [(n, (datasets.get(n).__doc__ or "").strip().splitlines()[0]) for n in datasets])


def cmd_quantizers(args: argparse.Namespace) -> None:
    import inspect

    from lowbit.quant import quantizers

    if args.name:  # one quantizer's documentation: formula, gradient rule, arguments, example, references
        cls = quantizers.get(args.name)
        print(f"{args.name} ({cls.__module__}.{cls.__name__})\n")
        print(inspect.getdoc(cls) or "(no documentation)")
        return
    rows = []
    for n in quantizers.list(args.glob):
        cls = quantizers.get(n)
        first = (inspect.getdoc(cls) or "").strip().splitlines()
        rows.append((n, first[0] if first else ""))
    if not rows:
        raise ValueError(f"no quantizer matches {args.glob!r}; quantizers: {', '.join(quantizers.list())}")
    _table(("quantizer", "what it does (lowbit quantizers --name NAME: formula, gradient, paper)"), rows)


def _int8_source(args: argparse.Namespace) -> tuple[Any, str, tuple[int, ...], str | None]:
    """(float model, title, input shape, data set name) for ``export`` / ``lower``."""
    from lowbit.models import model_entry

    if args.model.endswith((".safetensors", ".lbz")) or Path(args.model).is_file():
        model, meta = _load_file(args.model)
        arch = (meta.get("model") or {}).get("name")
        entry = model_entry(arch) if isinstance(arch, str) else None
        shape = meta.get("input_shape") or (entry.input_shape if entry else None)
        dataset = meta.get("dataset") or (entry.dataset if entry else None)
    else:
        from lowbit.models import create_model

        model, entry = create_model(args.model), model_entry(args.model)
        shape, dataset = entry.input_shape, entry.dataset
    shape = args.input_shape or (tuple(shape) if shape else None)
    if shape is None:
        raise ValueError(f"{args.model}: the input shape is unknown; pass --input-shape C,H,W")
    _check_accepts(model.eval(), args.model, tuple(shape))
    return model, args.model, tuple(shape), args.data or dataset


def _check_accepts(model: Any, title: str, shape: tuple[int, ...]) -> None:
    """One zero input of ``shape`` through ``model``: a shape it does not take is a one-line error here, not a
    traceback from deep inside calibration or an exporter."""
    import torch

    try:
        with torch.no_grad():
            model(torch.zeros(1, *shape))
    except RuntimeError as e:
        raise ValueError(f"{title} does not accept input {'x'.join(map(str, shape))}: "
                         f"{str(e).strip().splitlines()[0]}; pass --input-shape C,H,W") from None


def _calibrated(args: argparse.Namespace, model: Any, shape: tuple[int, ...], dataset: str | None) -> Any:
    """The model prepared for int8 and calibrated on ``--calibrate`` batches of real data (``--data``,
    default the model's data set) or, with ``--random-calibration``, of N(0, 1) inputs."""
    import torch

    from lowbit.graph import Int8Config, calibrate, prepare_ptq
    from lowbit.graph.prepare import is_int8_prepared

    if is_int8_prepared(model):  # an int8 checkpoint (QAT-trained or calibrated): its ranges are the model's
        print("the model is already prepared for int8 (its observed ranges are used; no calibration here)")
        return model
    cfg = Int8Config(weight_bits=args.weight_bits, calibration=args.calibration, rounding=args.rounding)
    prepared = prepare_ptq(model, cfg)
    if args.random_calibration or dataset is None:
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randn(32, *shape, generator=gen) for _ in range(args.calibrate)]
        print(f"calibrating on {args.calibrate} batches of random N(0, 1) inputs: the scales are placeholders")
    else:
        from lowbit.data import load_dataset
        from lowbit.recipe.runner import check_fits

        data = load_dataset(dataset, args.data_dir)
        check_fits(model, data, args.model)
        batches = data.loader("train", 128, shuffle=True, augment=False)
        print(f"calibrating on {args.calibrate} batches of {dataset} (train split)")
    calibrate(prepared, batches, args.calibrate)
    return prepared


def cmd_export(args: argparse.Namespace) -> None:
    import torch

    from lowbit.export import export

    float_model, title, shape, dataset = _int8_source(args)
    model = _calibrated(args, float_model, shape, dataset) if args.format == "onnx-qdq" else float_model
    out = args.out or str(Path(args.model).stem if Path(args.model).is_file() else args.model) + f".{args.format}.onnx"
    example = torch.zeros(1, *shape)
    path = export(model, out, format=args.format, example=example)
    print(f"{title}: wrote {path} ({path.stat().st_size:,} bytes, format {args.format})")
    if args.format == "onnx-qdq":
        from lowbit.export.onnx_qdq import cpu_has_vnni, integer_kernel_report, keep_float_if_slower

        rep = integer_kernel_report(path)
        print(f"onnxruntime (optimization level {rep['level']}): {rep['integer']} conv/linear on integer kernels, "
              f"{rep['float']} float" + (f": {', '.join(rep['float_nodes'])}" if rep["float"] else ""))
        if args.weight_bits == 8 and not cpu_has_vnni():
            print("note: this CPU has no VNNI: onnxruntime's u8s8 kernels here can saturate int16 pair sums with "
                  "8-bit weights; --weight-bits 7 keeps its results exactly those of the integer model")
        from lowbit.graph.prepare import is_int8_prepared

        if args.speed_batch and is_int8_prepared(float_model):
            print("speed check skipped: an int8 checkpoint holds no float model to compare with")
        elif args.speed_batch:
            sp = keep_float_if_slower(path, float_model, example, batch=args.speed_batch, threads=args.threads)
            verdict = ("kept int8" if sp["kept"] == "int8" else
                       f"int8 is slower here: wrote the FLOAT model to {path} instead ({path.stat().st_size:,} bytes); "
                       "--speed-batch 0 keeps the int8 file, and `lowbit profile` shows where its time goes")
            print(f"onnxruntime at batch {sp['batch']}, {sp['threads']} thread(s): int8 {sp['int8_ms']:.3f} ms, "
                  f"float {sp['float_ms']:.3f} ms ({sp['speedup']:.2f}x): {verdict}")


def cmd_lower(args: argparse.Namespace) -> None:
    from collections import Counter

    from lowbit.graph import convert, format_graph

    model, title, shape, dataset = _int8_source(args)
    prepared = _calibrated(args, model, shape, dataset)
    lowered = convert(prepared)
    if args.print:
        print(format_graph(prepared, title=f"== {title}: prepared (fused layers, quantization points) =="))
        print()
        print(format_graph(lowered, title=f"== {title}: lowered to integer operations =="))
    else:
        mods = dict(lowered.named_modules())
        ops = Counter(type(mods[n.target]).__name__ for n in lowered.graph.nodes if n.op == "call_module")
        print(f"{title}: " + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())) + " (--print shows the graph)")


def cmd_profile(args: argparse.Namespace) -> None:
    import json

    from lowbit.export.profile import format_profile, profile_onnx

    profiles = [profile_onnx(f, batch=args.batch, threads=args.threads, runs=args.runs, level=args.level)
                for f in args.files]
    if args.json:
        print(json.dumps(profiles, indent=1))
        return
    print("\n\n".join(format_profile(p, top=args.top) for p in profiles))
    if len(profiles) > 1:  # profiled one after the other: not a fair race (lowbit.timing's rule)
        print("\n(the files were timed one after the other; for a speed ratio, time them side by side: "
              "`lowbit export --speed-batch B` for int8 against float)")


def _load_file(path: str) -> tuple[Any, dict[str, Any]]:
    """(model, metadata) from a checkpoint (.safetensors) or a compressed model (.lbz)."""
    if path.endswith(".lbz"):
        from lowbit.codec import load_model as load_lbz

        return load_lbz(path)
    from lowbit.train import load_model

    model, ckpt = load_model(path)
    return model, ckpt.meta


def _model_or_checkpoint(ref: str) -> tuple[Any, str, tuple[int, ...] | None]:
    """(model, title, input shape recorded in the file) for a model name, a checkpoint or a .lbz path."""
    if ref.endswith((".safetensors", ".lbz")) or Path(ref).is_file():
        model, meta = _load_file(ref)
        shape = meta.get("input_shape")
        return model, ref, tuple(shape) if isinstance(shape, list) else None
    from lowbit.models import create_model

    return create_model(ref), ref, None


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _command(args: argparse.Namespace) -> str:
    return "lowbit " + shlex.join(args.argv)


def _shape(text: str) -> tuple[int, ...]:
    try:  # "1,28,28" or "1x28x28"; an empty part ("3,,2", "3,x,2") is a typo, not a missing dimension
        shape = tuple(int(p) for p in text.strip().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 1,28,28, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes like 1,28,28, got {text!r}")
    return shape


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lowbit")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lowbit", description="Quantize and compress neural networks, end to end.")
    ap.add_argument("--version", action="version", version=f"lowbit {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    data_dir = dict(metavar="DIR", help="where data sets live (default: $LOWBIT_DATA)")
    sets = dict(action="append", default=[], metavar="KEY=VALUE",
                help="override a recipe value, e.g. stages.0.epochs=3 (repeatable)")

    for name, fn, text in (("run", cmd_run, "run a YAML recipe"),
                           ("compress", cmd_compress, "run a compression recipe (prune, cluster, encode, report)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("recipe", metavar="RECIPE")
        p.add_argument("--set", **sets)
        p.add_argument("--data-dir", **data_dir)
        p.add_argument("--resume", action="store_true", help="continue training stages from their last checkpoints")
        p.set_defaults(fn=fn)

    p = sub.add_parser("train", help="train a registered model (a one-stage recipe)")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--data", metavar="DATASET", help="default: the model's own data set")
    p.add_argument("--epochs", type=float)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/train/MODEL)")
    p.add_argument("--set", **sets)
    p.add_argument("--data-dir", **data_dir)
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="test accuracy of a checkpoint (.safetensors) or compressed model (.lbz)")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--data", metavar="DATASET", help="default: the data set recorded in the checkpoint")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data-dir", **data_dir)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("summary", help="per-layer table of a model or checkpoint")
    p.add_argument("model", metavar="MODEL_OR_CHECKPOINT")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--input-shape", type=_shape, metavar="C,H,W", help="default: the model's registered input")
    p.set_defaults(fn=cmd_summary)

    p = sub.add_parser("models", help="list registered models")
    p.add_argument("glob", nargs="?", default="*", metavar="GLOB")
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("datasets", help="list registered data sets")
    p.set_defaults(fn=cmd_datasets)

    p = sub.add_parser("quantizers", help="list registered quantizers, or document one (--name)")
    p.add_argument("glob", nargs="?", default="*")
    p.add_argument("--name", help="print this quantizer's documentation")
    p.set_defaults(fn=cmd_quantizers)

    from lowbit.export import list_exporters

    int8_opts = (
        (("--calibrate",), dict(type=int, default=16, metavar="N", help="calibration batches (default 16)")),
        (("--data",), dict(metavar="DATASET", help="calibration data set (default: the model's)")),
        (("--random-calibration",), dict(action="store_true", help="calibrate on N(0, 1) inputs (no data)")),
        (("--calibration",), dict(choices=["minmax", "percentile", "mse"], default="minmax")),
        (("--weight-bits",), dict(type=int, choices=[8, 7], default=8,
                                  help="7: weights in [-63, 63] for AVX2 CPUs without VNNI (no int16 saturation)")),
        (("--rounding",), dict(choices=["gemmlowp", "single", "fp32"], default="gemmlowp")),
        (("--input-shape",), dict(type=_shape, metavar="C,H,W", help="default: the model's registered input")),
        (("--data-dir",), data_dir),
    )
    p = sub.add_parser("export", help="write a model for another runtime (onnx-qdq: int8, calibrated here)")
    p.add_argument("model", metavar="MODEL_OR_CHECKPOINT")
    p.add_argument("--format", required=True, choices=list_exporters())
    p.add_argument("--out", metavar="PATH", help="default: MODEL.FORMAT.onnx")
    p.add_argument("--speed-batch", type=int, default=1, metavar="B",
                   help="onnx-qdq: time int8 against float in onnxruntime at batch B on this machine and write the "
                        "float model if int8 is slower (default 1; 0: don't time)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads for --speed-batch (default 1)")
    for flags, kw in int8_opts:
        p.add_argument(*flags, **kw)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("lower", help="lower a model to int8 integer operations (calibrated here)")
    p.add_argument("model", metavar="MODEL_OR_CHECKPOINT")
    p.add_argument("--print", action="store_true", help="print the prepared and the lowered graph")
    for flags, kw in int8_opts:
        p.add_argument(*flags, **kw)
    p.set_defaults(fn=cmd_lower)

    p = sub.add_parser("profile", help="where onnxruntime spends the time of ONNX files, per op type and node")
    p.add_argument("files", nargs="+", metavar="FILE.onnx", help="e.g. a float and an int8 export of one model")
    p.add_argument("--batch", type=int, default=1, help="batch of the random inputs (default 1)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--runs", type=int, default=20, help="profiled runs; each node's median is kept (default 20)")
    p.add_argument("--level", choices=["basic", "extended", "all"], default="all",
                   help="onnxruntime graph optimization level (default all)")
    p.add_argument("--top", type=int, default=10, help="how many of the dearest nodes to list (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(fn=cmd_profile)
    return ap


def _user_error(e: BaseException) -> bool:
    from pydantic import ValidationError

    from lowbit._registry import UnknownNameError
    from lowbit.data import DataNotFoundError

    # FloatingPointError: the engine's "loss became nan ...; lower the learning rate" is meant for users
    return isinstance(e, (UnknownNameError, DataNotFoundError, ValidationError, ValueError, FloatingPointError))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowbit`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        args.fn(args)
    except KeyboardInterrupt:
        print("lowbit: interrupted (a training run continues with --resume)", file=sys.stderr)
        return 130
    except Exception as e:
        if not _user_error(e):
            raise
        first, *rest = str(e).splitlines() or [type(e).__name__]
        print("\n".join([f"lowbit: error: {first}", *rest]), file=sys.stderr)
        return EXIT_USAGE
    return 0
