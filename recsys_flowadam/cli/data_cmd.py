"""``recsys-flowadam data list | fetch NAME | info NAME``: the dataset layer on the command line."""

from __future__ import annotations

import argparse
import json

from recsys_flowadam.cli import CLIError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="list, download and inspect datasets",
                                   description="List, download and inspect the datasets.")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    p = sub.add_parser("list", help="the known datasets and whether they are present locally")
    _data_dir(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("fetch", help="download a dataset's official files (checksums verified)")
    p.add_argument("name", help="dataset name, e.g. ml-100k (see `data list`)")
    _data_dir(p)
    p.add_argument("--force", action="store_true", help="download again even when the files are present")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("info", help="load a dataset and print its figures")
    p.add_argument("name", help="dataset name, 'synthetic' or 'csv:PATH'")
    _data_dir(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--clip", action="store_true", help="clip ratings to the documented scale first")
    p.add_argument("--offline", action="store_true",
                   help="accepted for scripts; loading never downloads (use `data fetch`)")
    p.add_argument("--split", metavar="SPEC", help="also split it (random, u1..u5, ua, ub, kfold:K:F, temporal, "
                                                    "leave-out:K) and print the split's figures")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="loader option, repeatable (e.g. -o part=2, -o rank=5, -o sep=';')")
    p.set_defaults(func=cmd_info)


def _data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", metavar="D", help="data root, the folder holding one folder per dataset "
                                                   "(default: $RECSYS_FLOWADAM_DATA, else the user cache dir)")


def _parse_options(pairs: list[str]) -> dict:
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CLIError(f"option {pair!r} is not KEY=VALUE")
        out[key.strip()] = _value(value)
    return out


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def cmd_list(args: argparse.Namespace) -> int:
    from recsys_flowadam.data import DATASETS, resolve_data_dir
    from recsys_flowadam.data.paths import INCOMPLETE_MARKER, data_root_origin, dataset_folder
    from recsys_flowadam.data.registry import SPECIAL_NAMES

    root = resolve_data_dir(args.data_dir)
    rows = []
    for info in DATASETS.values():
        folder = dataset_folder(info.name, args.data_dir)
        have = [(folder / f).is_file() for f in info.files]
        present = "yes" if all(have) else ("partly" if any(have) else "no")
        if (folder / INCOMPLETE_MARKER).exists():
            present = "broken"  # a download stopped while moving files in: `data fetch NAME --force`
        rows.append({"name": info.name, "description": info.description, "size": info.size,
                     "licence": info.licence, "present": present, "path": str(folder)})
    if args.json:
        from recsys_flowadam.cli.output import print_json

        print_json({"data_dir": str(root), "datasets": rows,
                    "generated": [{"name": k, "description": v} for k, v in SPECIAL_NAMES.items()]}, indent=1)
        return 0
    print(f"data root: {root} ({data_root_origin(args.data_dir)})")
    widths = [max(len(r[k]) for r in rows) for k in ("name", "size", "present")]
    print(f"{'NAME':<{widths[0]}}  {'SIZE':<{widths[1]}}  {'LOCAL':<7}  DESCRIPTION / LICENCE")
    for r in rows:
        print(f"{r['name']:<{widths[0]}}  {r['size']:<{widths[1]}}  {r['present']:<7}  {r['description']}")
        print(f"{'':<{widths[0]}}  {'':<{widths[1]}}  {'':<7}  licence: {r['licence']}")
    for k, v in SPECIAL_NAMES.items():
        print(f"{k:<{widths[0]}}  {'-':<{widths[1]}}  {'-':<7}  {v}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    import sys

    from recsys_flowadam.data import DataError, resolve_data_dir
    from recsys_flowadam.data.download import fetch
    from recsys_flowadam.data.paths import data_root_origin

    print(f"data root: {resolve_data_dir(args.data_dir)} ({data_root_origin(args.data_dir)})", file=sys.stderr)
    try:
        folder = fetch(args.name, args.data_dir, force=args.force)
    except DataError as exc:
        raise CLIError(str(exc)) from None
    print(f"{args.name}: files in {folder}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from recsys_flowadam.data import DataError, load_dataset, split_ratings

    options = _parse_options(args.option)
    try:
        ratings = load_dataset(args.name, args.data_dir, offline=args.offline, clip=args.clip, **options)
        summary = ratings.summary()
        summary["name"] = args.name
        summary["description"] = ratings.description
        summary["clipped"] = bool(args.clip)
        summary["source_files"] = dict(ratings.source_files)
        summary["official_n_ratings"] = _official_count(args.name, options)
        if args.split:
            summary["split"] = split_ratings(ratings, args.split, args.seed).summary()
    except DataError as exc:
        raise CLIError(str(exc)) from None
    if args.json:
        from recsys_flowadam.cli.output import print_json

        print_json(summary, indent=1)
        return 0
    s = summary
    print(f"{s['name']}: {s['description']}")
    shape = f"{s['n_users']:,} users x {s['n_items']:,} items" + (
        f" x {s['n_contexts']:,} contexts" if s["n_contexts"] else "")
    print(f"  {shape}, {s['n_ratings']:,} ratings, density {s['density']:.4%}")
    print(f"  scale {s['scale_min']:g}..{s['scale_max']:g}; observed {s['rating_min']:g}..{s['rating_max']:g}, "
          f"mean {s['rating_mean']:.4f}")
    print(f"  outside the scale: {s['out_of_scale']:,}" + (" (after clipping)" if args.clip else
                                                             ("  (use --clip to clip them)" if s["out_of_scale"] else "")))
    if s["official_n_ratings"] not in (None, s["n_ratings"]):
        print(f"  note: the official release has {s['official_n_ratings']:,} ratings: truncated or modified files?")
    if s["n_duplicates"]:
        print(f"  duplicated pairs resolved: {s['n_duplicates']:,}")
    print(f"  timestamps: {'yes' if s['has_timestamps'] else 'no'}; titles: {'yes' if s['has_titles'] else 'no'}")
    if "split" in s:
        print(f"  split: {json.dumps(s['split'])}")
    return 0


def _official_count(name: str, options: dict) -> int | None:
    from recsys_flowadam.data import DATASETS

    info = DATASETS.get(name)
    return info.n_ratings if info is not None and not options else None
