"""``recsys-flowadam evaluate DIR``: held-out RMSE/MAE of an artifact, overall and cold-start."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="RMSE/MAE of an artifact on a test split",
        description="Evaluate an artifact on the test ratings of the split it was trained with (or another "
                    "--dataset/--split/--seed). Raw user/item IDs are matched through the artifact; ratings "
                    "of users or items with no training rating use the cold-start rule and are also "
                    "reported separately. Predictions are clipped to the rating scale unless --no-clip.")
    p.add_argument("artifact", metavar="DIR", help="artifact folder written by `train`")
    p.add_argument("--dataset", help="dataset name (default: the artifact's)")
    p.add_argument("--split", help="split spec (default: the artifact's)")
    p.add_argument("--seed", type=int, help="split seed (default: the artifact's)")
    p.add_argument("--data-dir", help="data root")
    p.add_argument("--offline", action="store_true", help="never download")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-clip", dest="clip", action="store_false", help="do not clip predictions")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from recsys_flowadam.artifact import ArtifactError
    from recsys_flowadam.cli import CLIError
    from recsys_flowadam.safe_write import json_safe
    from recsys_flowadam.train.pipeline import evaluate_artifact

    try:
        result = evaluate_artifact(args.artifact, dataset=args.dataset, split=args.split, seed=args.seed,
                                   data_dir=args.data_dir, offline=args.offline, clip=args.clip,
                                   device=args.device)
    except (ArtifactError, ValueError) as exc:  # DataError is a ValueError
        raise CLIError(str(exc)) from None
    result = json_safe(result)
    if args.json:
        from recsys_flowadam.cli.output import print_json

        print_json(result)
        return 0

    def f(x):
        return "n/a" if x is None else f"{x:.4f}"

    print(f"{result['artifact']} on {result['dataset']} ({result['split']}, seed {result['seed']}), "
          f"{'clipped' if result['clipped'] else 'raw'} predictions")
    print(f"  all test ratings:   RMSE {f(result['rmse'])}  MAE {f(result['mae'])}  n {result['n']:,}")
    for key, label in (("cold_users", "users unseen in training"), ("cold_items", "items unseen in training")):
        m = result[key]
        print(f"  {label}: RMSE {f(m['rmse'])}  MAE {f(m['mae'])}  n {m['n']:,}")
    for w in result["warnings"]:
        print(f"  warning: {w}")
    return 0
