"""Predict image files with a trained fusion model: a run, its complete checkpoint, or a file mcn.export wrote.

    python -m mcn.predict RUN images/ --output predictions.csv
    python -m mcn.predict RUN manifest.csv --labels label          # accuracy, confusion matrix, per-class accuracy
    python -m mcn.predict model.onnx "photos/**/*.png" --no-calibration

RUN may be a folder of runs (a sweep or a study): its run with the best validation accuracy is used. Images are
folders (every image under them), CSV manifests (a `path` column) and image files or glob patterns; each is decoded,
resized and normalised by the run's own input rule. One CSV row per image: path, predicted class, its probability
(calibrated by the temperature fitted on the run's validation part, unless --no-calibration), the top k, each
expert's prediction and probability, and whether the experts agree.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mcn.cli import ArgumentParser, one_line_errors, warn
from mcn.files import check_writable, write_csv
from mcn.inference.images import FOLDER_LABELS, gather
from mcn.inference.model import open_engine
from mcn.inference.report import prediction_columns, prediction_rows, report_paths, write_label_report


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m mcn.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model",
        help="a fusion run's folder (or a folder of runs), its complete checkpoint, or an exported .onnx / .pt2",
    )
    parser.add_argument("images", nargs="+", help="folders, CSV manifests, image files or glob patterns")
    parser.add_argument("--output", default="predictions.csv", help="the CSV to write (default: %(default)s)")
    parser.add_argument("--fusion_type", help="needed when the run folder holds several")
    parser.add_argument("--top_k", type=int, default=5, help="classes listed per image (default: %(default)s)")
    parser.add_argument("--no-calibration", action="store_true", help="raw softmax probabilities (temperature 1)")
    parser.add_argument(
        "--labels",
        help=f"'{FOLDER_LABELS}' (each image's folder names its class) or a manifest's column: adds accuracy, the "
        "confusion matrix and per-class accuracy",
    )
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto (a GPU when visible), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--precision", choices=["auto", "bf16", "fp32"], help="default: the run's trainer.precision (exports: fp32)"
    )
    parser.add_argument(
        "--on-bad-file", choices=["error", "skip"], default="error", help="skip: leave unusable files out, listing each"
    )
    parser.add_argument("--progress_bar", default="auto", choices=["auto", "true", "false"])
    args = parser.parse_args(argv)
    with one_line_errors():
        output = Path(args.output)
        if output.suffix != ".csv":
            parser.error(f"--output {output}: name a .csv file, e.g. {output.with_suffix('.csv')}")
        check_writable(report_paths(output) if args.labels else [output], fix="pass another --output")
        inputs = gather(args.images, args.labels)
        bar = {"auto": "auto", "true": True, "false": False}[args.progress_bar]
        engine = open_engine(args.model, args.fusion_type, args.device, args.precision, bar)
        prediction = engine.predict(
            inputs, calibrated=not args.no_calibration, batch_size=args.batch_size, on_bad_file=args.on_bad_file
        )
        for path, why in prediction.skipped:
            warn(f"skipped {path}: {why}")
        if not prediction.paths:
            parser.error("every image was skipped; nothing to predict")
        summary = write_label_report(prediction, output.with_suffix("")) if args.labels else None
        write_csv(output, prediction_columns(prediction, args.top_k), prediction_rows(prediction, args.top_k))
        calibration = "raw softmax" if args.no_calibration else f"temperature {prediction.temperature:.4f}"
        print(f"{len(prediction.paths)} images predicted by {engine.source} ({calibration}): {output}")
        if summary is not None:
            print(f"accuracy {summary[0]['accuracy']:.4f} on {summary[0]['images']} labelled images; per class:")
            for name, value in summary[0]["per_class"].items():
                print(f"  {name}: {'no images' if value is None else f'{value:.4f}'}")
            print("wrote " + ", ".join(map(str, summary[1])))
        sys.stdout.flush()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
