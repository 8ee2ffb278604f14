"""The after-training sub-commands of `fedsafe`: export, predict, card, explain, compress.

fedsafe.cli registers them with `add_parsers` and dispatches through HANDLERS; `predict` is run before the
CLI imports anything else (fedsafe.after.predict needs only onnxruntime and numpy), see PREDICT.
"""

from __future__ import annotations

import argparse

PREDICT = "predict"


def add_parsers(sub) -> None:
    run_help = "a finished run directory (results/<run>/: metrics.json, checkpoint.pt)"
    weights_help = "global: the model after the last round (checkpoint.pt); best: early stopping's best_model.pt"

    p = sub.add_parser("export", help="export a run's model as ONNX or TorchScript, with its input spec and card")
    p.add_argument("run", help=run_help)
    p.add_argument("--format", default="onnx", choices=("onnx", "torchscript"))
    p.add_argument("--weights", default="global", choices=("global", "best"), help=weights_help)
    p.add_argument("--out", default=None, help="output directory (default: RUN/export)")

    sub.add_parser(PREDICT, add_help=False,
                   help="score a CSV/NPZ with an exported ONNX model (`fedsafe predict --help`)")

    p = sub.add_parser("card", help="(re)write a run's MODEL_CARD.md and model_card.json")
    p.add_argument("run", help=run_help)
    p.add_argument("--ledgers", default=None, help="the nodes' ledger directory, if not RUN/ledgers (simulation)")

    p = sub.add_parser("explain", help="attributions of a run's model on the coordinator's held-out data (no ε)")
    p.add_argument("run", help=run_help)
    p.add_argument("--method", default="ig", choices=("ig", "gradientshap"),
                   help="Captum Integrated Gradients or GradientSHAP")
    p.add_argument("--records", type=int, default=200, help="held-out records to explain")
    p.add_argument("--data", default=None,
                   help="only the run's held-out data is accepted (a node's private data is refused: it would cost ε)")
    p.add_argument("--weights", default="global", choices=("global", "best"), help=weights_help)
    p.add_argument("--out", default=None, help="output directory (default: RUN/explain)")

    p = sub.add_parser("compress", help="prune and int8-quantise a run's model; size and accuracy before and after")
    p.add_argument("run", help=run_help)
    p.add_argument("--prune", type=float, default=None, help="fraction of Linear/Conv weights to zero (default 0.4)")
    p.add_argument("--weights", default="global", choices=("global", "best"), help=weights_help)
    p.add_argument("--out", default=None, help="output directory (default: RUN/compressed)")


def _export(args: argparse.Namespace) -> int:
    from .export import export_model

    path, spec = export_model(args.run, args.out, args.format, args.weights)
    print(f"exported {spec.family} ({spec.task}, {args.weights} weights) to {path}; input {spec.input_name} "
          f"(batch, {', '.join(map(str, spec.input_shape))}) float32 -> {', '.join(spec.output_names)}")
    print(f"checked on {spec.parity_samples} held-out records: max |{args.format} - PyTorch| = "
          f"{spec.parity_max_abs_error:.3g}; spec {path.name}.json and the model card beside it")
    return 0


def _card(args: argparse.Namespace) -> int:
    from .card import write_model_card

    markdown, document = write_model_card(args.run, args.ledgers)
    print(f"model card: {markdown}, {document}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from .explain import PRIVACY_NOTE, explain_run

    result = explain_run(args.run, args.out, args.method, args.records, args.data, args.weights)
    print(f"{result.method} attributions of {result.target} on {result.records} held-out records: "
          f"{result.csv}, {result.png}")
    if result.completeness_max_abs_error is not None:
        print(f"completeness: |sum of attributions - (f(x) - f(baseline))| ≤ {result.completeness_max_abs_error:.3g}")
    print(f"privacy: {PRIVACY_NOTE}")
    return 0


def _compress(args: argparse.Namespace) -> int:
    from .compress import DEFAULT_PRUNE, compress_run

    r = compress_run(args.run, args.out, DEFAULT_PRUNE if args.prune is None else args.prune, args.weights)
    print(f"pruned {r.pruned_fraction:.0%} of the Linear/Conv weights, quantised to int8: {r.model}")
    print(f"size: {r.bytes_before:,} -> {r.bytes_after:,} bytes ({r.ratio:.2f}x); gzip {r.gzip_bytes_before:,} -> "
          f"{r.gzip_bytes_after:,} ({r.gzip_ratio:.2f}x); weights alone {r.weight_bytes_before:,} -> "
          f"{r.weight_bytes_after:,} ({r.weight_ratio:.2f}x)")
    print(f"{r.metric} on {r.records} held-out records: {r.before:.4f} before, {r.after_pruning:.4f} pruned, "
          f"{r.after:.4f} pruned + int8")
    return 0


HANDLERS = {"export": _export, "card": _card, "explain": _explain, "compress": _compress}


def errors() -> tuple[type[BaseException], ...]:
    """The after-training errors the CLI prints as one line."""
    from .compress import CompressError
    from .explain import ExplainError
    from .export import ExportError
    from .run import RunDirError

    return (RunDirError, ExportError, ExplainError, CompressError)


def run_predict(argv: list[str]) -> int:
    from .predict import main

    return main(argv, prog=f"fedsafe {PREDICT}")
