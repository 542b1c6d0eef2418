"""Export a finished fusion run's model for use without mcn, with a parity check against the eager model.

    python -m mcn.export RUN --format onnx                 # RUN/export/<fusion type>.onnx (+ .json contract, card)
    python -m mcn.export RUN --format pt2 --with_experts   # each expert's logits as a second output
    python -m mcn.predict RUN/export/<fusion type>.onnx images/

The exported model takes normalised images [batch, C, H, W] (any batch size) and gives the fused logits; the input
contract beside it (`<file>.json`) says how images become that tensor. The export is refused, with nothing written,
when its logits differ from the eager model's by more than --tolerance on the run's test images.
"""

from __future__ import annotations

from mcn.cli import ArgumentParser, one_line_errors
from mcn.inference.export import DEFAULT_TOLERANCE, FORMATS, export


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m mcn.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a finished fusion run's folder, or its complete checkpoint")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", help="the exported file (default: RUN/export/<fusion type>.<format>)")
    parser.add_argument("--fusion_type", help="needed when the run folder holds several")
    parser.add_argument("--with_experts", action="store_true", help="each expert's logits as a second output")
    parser.add_argument(
        "--tolerance", type=float, default=DEFAULT_TOLERANCE, help="largest |logit difference| accepted (%(default)g)"
    )
    parser.add_argument("--parity_images", type=int, default=256, help="test images the check runs on")
    args = parser.parse_args(argv)
    with one_line_errors():
        paths, parity = export(
            args.run,
            args.format,
            args.output,
            fusion_type=args.fusion_type,
            with_experts=args.with_experts,
            tolerance=args.tolerance,
            parity_images=args.parity_images,
        )
        print(parity.line())
        print("wrote " + ", ".join(map(str, paths)))
        print(f"use it: python -m mcn.predict {paths[0]} <images>")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
