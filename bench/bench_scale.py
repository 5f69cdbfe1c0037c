"""Ours against Cornac MF and LensKit biased ALS on a generated explicit-ratings problem of 1M, 10M or
25M ratings: the same train/test files, side by side in one run, with ratios to Cornac.

    python3 -m venv /work/peers-venv && /work/peers-venv/bin/pip install cornac lenskit  # once, apart
    python bench/bench_scale.py --size 1m --peer-python /work/peers-venv/bin/python [--seed 0 --out DIR --threads 1]

The problem (``--size 1m|10m|25m`` or ``--ratings N``, ``--seed S``): about 62k users x 10k items at
10M ratings (users ~ N^0.8, items ~ N^0.5 at other sizes); lognormal user activity and item
popularity; a rank-15 truth plus user and item biases (popular items a little better rated) plus
Gaussian noise; half-star ratings clipped to 0.5..5. It is drawn with vectorised numpy, split 90/10
at random with a seeded permutation (test users and items are nearly all seen in train; the count
of cold test ratings is printed) and written once per (size, seed) under ``--out`` as ``train.csv``
and ``test.csv`` (``user,item,rating``, rows in random order); later runs reuse the files.

Contenders, each in a process of its own (``bench/peers/``), reading the same two files:
* Cornac MF (Cython SGD; k=20, 20 epochs, lr 0.01, lambda 0.02, biases) and LensKit biased ALS
  (20 features, 10 epochs) in ``--peer-python``'s environment; peers are never project dependencies.
* Ours through ``recsys_flowadam.Recommender`` (the Python path of ``train``) with ``train``'s
  defaults: no tuning flags, exactly what a user runs (the default optimizer, and ``optimizer="adam"``
  as ``--optimizer adam``); ``train`` picks its path, batch, schedule and validation cadence by
  itself, and the run prints what it chose. Like ``train``, ours early-stops on a validation part: a
  seeded 1/8 of the training file; on the automatic mini-batch path all but 100k of it joins the
  one training run (``pipeline.fold_validation``), so ours fits 99% of the ratings the peers fit at
  10M (7/8, then a refit on all, below 3M ratings).

What is printed for each: test RMSE (every contender's predictions clipped to 0.5..5, scored by the
same code), fit time, wall time, time to reach Cornac's test RMSE, peak memory and ratios to Cornac.
* fit time: the library's training call after the data is loaded and indexed: Cornac ``MF.fit``,
  LensKit ``train``, ours ``Recommender.fit`` on ``Ratings`` (everything ``train`` does after
  loading: path choice, training, validation, the artifact). Each one's indexing of the raw IDs is
  timed apart as "prep" (Cornac's and LensKit's Dataset construction; ours: the DataFrames to
  ``Ratings``, what ``Recommender.fit`` does first with DataFrames). Imports are outside every
  contender's fit; ours' (torch and ``torch._dynamo``, which torch's optimizers import) are timed
  and printed. The training loop alone is printed too.
* wall: the whole process: interpreter start, imports, reading the CSV files, fit, scoring.
* peak memory: the process's maximum resident set size (``os.wait4``'s rusage of the child).
* time to reach Cornac's RMSE (Cornac's own is its fit time). For ours this comes from a separate,
  clearly labelled measurement run per optimizer (``--trace`` in ``bench/peers/ours.py``): the same
  training part, seed and settings as the main run, with the *test* file given as the validation
  part, so every evaluation in its history records the test RMSE along the trajectory. The time is
  the first evaluation whose test RMSE <= Cornac's + 0.002 (``--reach-slack``), counted from the
  start of ``fit``: the evaluation's elapsed loop time plus everything ``fit`` spends outside the
  loop (an upper bound). The trace run's own final metrics are never reported as ours' RMSE (its
  early stopping saw test data). A trace costs a whole training run, so none is made for a run
  whose test RMSE ended more than ``--trace-margin`` (0.01) above the target: it is reported as
  not reached. ``--no-trace`` skips all traces; ``--target-rmse`` sets the target without Cornac.
``--ours-set KEY=VALUE`` (repeatable) adds two more runs of ours with those settings (e.g. ``reg=0.05``),
labelled with them in every line: they are not ``train``'s defaults.
Ours' kernels are compiled by numba once per installation and cached on disk (about 6 s here); a
warm-up process (``ours.py --warm-up``, a small fit down the same path) builds that cache before any
timed run, as a peer's Cython was compiled when it was installed, and its time is printed.
The load average is printed at the start and the end, and each process's start is in the table's
"load" column: this machine is shared, and timings taken under load say so. Everything is written
to ``<out>/results-<N>-seed<S>-threads<T>.json`` and each process's output to ``<out>/logs/``.
``--threads 1`` gives every contender one thread: on a busy machine torch's default of one thread
per core is slowed far more than the others by the competing processes. ``--rounds N`` runs the
contenders N times in turn and prints each round's fit/Cornac ratios and their median (the logs
keep the last round's output).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "bench" / "peers"
SIZES = {"1m": 1_000_000, "10m": 10_000_000, "25m": 25_000_000}
GENERATOR_VERSION = 2

RANK, MEAN = 15, 3.5
USER_SIGMA, ITEM_SIGMA = 1.0, 1.2  # lognormal spreads of user activity and item popularity
USER_BIAS_SD, ITEM_BIAS_SD, POPULARITY_BIAS = 0.35, 0.40, 0.15
SIGNAL_SD, NOISE_SD = 0.55, 0.78  # std of the low-rank term and of the Gaussian noise
TEST_SHARE = 0.10
CHUNK = 2_000_000  # ratings per chunk when gathering factor rows (bounds memory at 25M)


@dataclass(frozen=True)
class Shape:
    """How big the generated problem is."""

    n_ratings: int
    n_users: int
    n_items: int
    rank: int = RANK


def problem_shape(n_ratings: int) -> Shape:
    """Users and items for ``n_ratings``: 62k x 10k at 10M, users ~ N^0.8 and items ~ N^0.5 around it."""
    s = n_ratings / 10_000_000
    shape = Shape(n_ratings, max(200, round(62_000 * s ** 0.8)), max(100, round(10_000 * s ** 0.5)))
    if n_ratings < 10_000 or n_ratings > 0.3 * shape.n_users * shape.n_items:
        raise SystemExit(f"--ratings {n_ratings}: give at least 10,000")
    return shape


# ------------------------------------------------------------------------------------------------
# the generated problem


def sample_pairs(shape: Shape, user_w: np.ndarray, item_w: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n_ratings`` distinct (user, item) pairs drawn with probability ~ user_w[u] * item_w[i].

    Each round draws the missing count (plus 20%) at once and drops repeated pairs; rounds repeat
    only while saturated pairs (heavy users x popular items) are redrawn."""
    pu, pi = user_w / user_w.sum(), item_w / item_w.sum()
    keys = np.empty(0, dtype=np.int64)
    for _ in range(50):
        missing = shape.n_ratings - len(keys)
        if missing <= 0:
            break
        m = int(missing * 1.2) + 1000
        drawn = rng.choice(shape.n_users, m, p=pu) * np.int64(shape.n_items) + rng.choice(shape.n_items, m, p=pi)
        keys = np.sort(np.concatenate([keys, drawn]))
        keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]  # distinct (a sort beats np.unique's hash)
    if len(keys) < shape.n_ratings:
        raise RuntimeError("could not draw enough distinct (user, item) pairs")
    keys = keys[rng.permutation(len(keys))[:shape.n_ratings]]  # a random subset, in random order
    return keys // shape.n_items, keys % shape.n_items


def true_scores(users: np.ndarray, items: np.ndarray, shape: Shape, item_w: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """Noise-free scores: mean + user bias + item bias (popular items a little higher) + low rank."""
    b_u = rng.normal(0.0, USER_BIAS_SD, shape.n_users)
    log_pop = np.log(item_w)
    b_i = rng.normal(0.0, ITEM_BIAS_SD, shape.n_items) + POPULARITY_BIAS * (log_pop - log_pop.mean()) / log_pop.std()
    s = np.sqrt(SIGNAL_SD / np.sqrt(shape.rank))  # the dot product of rank terms then has std SIGNAL_SD
    p = rng.normal(0.0, s, (shape.n_users, shape.rank)).astype(np.float32)
    q = rng.normal(0.0, s, (shape.n_items, shape.rank)).astype(np.float32)
    out = MEAN + b_u[users] + b_i[items]
    for a in range(0, len(users), CHUNK):
        u, i = users[a:a + CHUNK], items[a:a + CHUNK]
        out[a:a + CHUNK] += np.einsum("nk,nk->n", p[u], q[i])
    return out


def generate(shape: Shape, seed: int) -> dict[str, np.ndarray]:
    """The whole problem: user, item, half-star rating and the noise-free score of every rating."""
    rng = np.random.default_rng([seed, shape.n_ratings, GENERATOR_VERSION])
    user_w = rng.lognormal(0.0, USER_SIGMA, shape.n_users)
    item_w = rng.lognormal(0.0, ITEM_SIGMA, shape.n_items)
    users, items = sample_pairs(shape, user_w, item_w, rng)
    truth = true_scores(users, items, shape, item_w, rng)
    noisy = truth + rng.normal(0.0, NOISE_SD, len(truth))
    rating = np.clip(np.round(noisy * 2.0) / 2.0, 0.5, 5.0).astype(np.float32)
    return {"user": users + 1, "item": items + 1, "rating": rating, "truth": truth}


def describe(data: dict[str, np.ndarray], test: np.ndarray, shape: Shape, seed: int) -> dict:
    """Facts about a generated problem and its split (written beside the files, printed). The
    noise floor is the test RMSE of the noise-free scores (clipped): about what a perfect model gets."""
    train_mask = np.ones(len(data["user"]), dtype=bool)
    train_mask[test] = False
    seen_u = np.isin(data["user"][test], np.unique(data["user"][train_mask]))
    seen_i = np.isin(data["item"][test], np.unique(data["item"][train_mask]))
    floor = np.clip(data["truth"][test], 0.5, 5.0) - data["rating"][test]
    return {"generator_version": GENERATOR_VERSION, "seed": seed, **asdict(shape),
            "users_with_ratings": int(len(np.unique(data["user"]))),
            "items_with_ratings": int(len(np.unique(data["item"]))),
            "n_train": int(train_mask.sum()), "n_test": int(len(test)),
            "test_cold": int((~(seen_u & seen_i)).sum()), "rating_mean": float(data["rating"].mean()),
            "rating_std": float(data["rating"].std()), "noise_floor_test_rmse": float(np.sqrt(np.mean(floor ** 2)))}


def write_csv(path: Path, data: dict[str, np.ndarray], rows: np.ndarray) -> None:
    """``user,item,rating`` rows, written to a temporary name and moved into place. Half-star
    ratings go out as a categorical of their ten labels (pandas formats floats slowly)."""
    import pandas as pd

    half_stars = np.rint(data["rating"][rows] * 2).astype(np.int64) - 1  # 0.5 -> 0 ... 5.0 -> 9
    labels = [f"{k / 2:.1f}" for k in range(1, 11)]
    frame = pd.DataFrame({"user": data["user"][rows], "item": data["item"][rows],
                          "rating": pd.Categorical.from_codes(half_stars, labels)})
    tmp = path.with_name(path.name + ".part")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def ensure_problem(out: Path, shape: Shape, seed: int) -> tuple[Path, dict]:
    """The folder holding ``train.csv``/``test.csv``/``problem.json`` for (size, seed), made once."""
    folder = out / f"data-{shape.n_ratings}-seed{seed}"
    meta_path = folder / "problem.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("generator_version") == GENERATOR_VERSION:
            print(f"reusing {folder}", flush=True)
            return folder, meta
    folder.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # an older generator's files: no longer complete until rewritten
    t0 = time.perf_counter()
    data = generate(shape, seed)
    perm = np.random.default_rng([seed, shape.n_ratings, GENERATOR_VERSION, 1]).permutation(shape.n_ratings)
    n_test = int(round(TEST_SHARE * shape.n_ratings))
    test, train = perm[:n_test], perm[n_test:]
    meta = describe(data, test, shape, seed)
    write_csv(folder / "train.csv", data, train)
    write_csv(folder / "test.csv", data, test)
    meta["generate_seconds"] = round(time.perf_counter() - t0, 2)
    meta_path.write_text(json.dumps(meta, indent=1))  # written last: it marks the files complete
    print(f"generated {folder} in {meta['generate_seconds']:.1f} s", flush=True)
    return folder, meta


# ------------------------------------------------------------------------------------------------
# running the contenders


@dataclass(frozen=True)
class Contender:
    """One process to run: its key (also the log name), its python and its runner's arguments."""

    key: str
    python: str
    script: str
    extra: tuple[str, ...] = ()


def run_process(cmd: list[str], out, err, timeout: float | None) -> tuple[int | None, os.struct_rusage | None, float]:
    """``(exit code or None when killed at the timeout, the child's rusage, wall seconds)``.

    The child is reaped with ``os.wait4``, which returns its own resource usage (peak memory);
    it is killed when the timeout passes or this process is interrupted."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT)
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return proc.returncode, usage, time.perf_counter() - t0
            if timeout is not None and time.perf_counter() - t0 > timeout:
                proc.kill()
                proc.wait()
                return None, None, time.perf_counter() - t0
            time.sleep(0.05)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def run_contender(c: Contender, folder: Path, args: argparse.Namespace, logs: Path) -> dict:
    """Run one contender's process; its JSON result plus wall time and peak RSS (``os.wait4``)."""
    cmd = [c.python, str(PEERS / c.script), "--train", str(folder / "train.csv"), "--test",
           str(folder / "test.csv"), "--seed", str(args.seed), "--threads", str(args.threads), *c.extra]
    load = os.getloadavg()[0]
    print(f"running {c.key} (load average {load:.2f}) ...", flush=True)
    out_path, err_path = logs / f"{c.key}.out", logs / f"{c.key}.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        code, usage, wall = run_process(cmd, out, err, args.timeout)
    lines = out_path.read_text().strip().splitlines()
    if code != 0 or not lines:
        why = f"timed out after {args.timeout} s" if code is None else f"exit {code}"
        tail = " | ".join(err_path.read_text().strip().splitlines()[-3:])
        print(f"  {c.key} failed ({why}): {tail}", flush=True)
        return {"key": c.key, "error": f"{why}: {tail}"}
    result = json.loads(lines[-1])
    result.update(key=c.key, wall_seconds=wall, peak_rss_mb=usage.ru_maxrss / 1024,  # ru_maxrss: KiB on Linux
                  load_at_start=load)
    return result


def warm_up_ours(logs: Path, args: argparse.Namespace) -> dict:
    """Build ours' compiled kernels into numba's on-disk cache before any timed run (``ours.py
    --warm-up``: a small fit down the same path); a no-op where the cache is already built."""
    print("warming up ours' compiled kernels (numba's on-disk cache, built once per installation) ...", flush=True)
    with open(logs / "ours-warm-up.out", "w") as out, open(logs / "ours-warm-up.err", "w") as err:
        code, _, wall = run_process([sys.executable, str(PEERS / "ours.py"), "--warm-up"], out, err, args.timeout)
    if code != 0:
        tail = " | ".join((logs / "ours-warm-up.err").read_text().strip().splitlines()[-3:])
        raise SystemExit(f"ours' warm-up failed (exit {code}): {tail}")
    print(f"  done in {wall:.1f} s (a few seconds more when it compiled)", flush=True)
    return {"wall_seconds": wall}


def contenders(args: argparse.Namespace) -> tuple[list[Contender], list[Contender]]:
    """``(main runs, trace runs)`` for the selected contenders."""
    ours = [("ours-default", ()), ("ours-adam", ("--optimizer", "adam"))]
    if args.ours_set:  # labelled extra runs with settings given: not train's defaults
        given = tuple(a for pair in args.ours_set for a in ("--set", pair))
        ours += [(f"{key}-set", extra + given) for key, extra in ours]
    runs = []
    if args.peer_python:
        runs += [Contender("cornac", args.peer_python, "cornac_mf.py"),
                 Contender("lenskit", args.peer_python, "lenskit_als.py")]
    runs += [Contender(key, sys.executable, "ours.py", extra) for key, extra in ours]
    runs = [c for c in runs if c.key in args.only]
    traces = [Contender(f"{c.key}-trace", c.python, c.script, c.extra + ("--trace",))
              for c in runs if c.key.startswith("ours")]
    return runs, ([] if args.no_trace else traces)


def worth_tracing(trace_runs: list[Contender], results: list[dict], target: float | None,
                  args: argparse.Namespace) -> list[Contender]:
    """The trace runs to make: none without a target; none for a contender whose main run ended
    more than ``--trace-margin`` above the target (its trajectory's test RMSE cannot plausibly
    reach it, and a trace costs a whole training run); those are reported as not reached."""
    if target is None:
        return []
    main = {r["key"]: r for r in results}
    keep = []
    for c in trace_runs:
        r = main.get(c.key.removesuffix("-trace"), {})
        if "test_rmse" in r and r["test_rmse"] > target + args.trace_margin:
            r["reach_note"] = (f"not reached: test RMSE {r['test_rmse']:.4f} is more than {args.trace_margin} "
                               "above the target (no trace run)")
            print(f"skipping {c.key}: {r['reach_note']}", flush=True)
        elif "error" not in r:
            keep.append(c)
    return keep


def reach_step(trace: dict, target: float) -> int | None:
    """The step of the trace's first evaluation with test RMSE <= target."""
    return next((h["step"] for h in trace.get("history", []) if h["test_rmse"] is not None
                 and h["test_rmse"] <= target), None)


def seconds_at(run: dict, step: int) -> float | None:
    """Seconds from the start of ``fit`` to the evaluation at ``step``: its elapsed loop time plus
    all the time ``fit`` spent outside the loop (counted as if spent before it: an upper bound)."""
    outside_loop = max(run["fit_seconds"] - run["loop_seconds"], 0.0)
    return next((outside_loop + h["seconds"] for h in run.get("history", []) if h["step"] == step), None)


# ------------------------------------------------------------------------------------------------
# the report


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def same_trajectory(run: dict, trace: dict) -> tuple[bool, str]:
    """Whether the trace run trained exactly as the main run: the same training loss at every
    evaluation both made (they differ only in the held-out part they score); a refit's records are
    not the trajectory (the trace run has none)."""
    a = {h["step"]: h["train_loss"] for h in run.get("history", []) if h.get("phase") != "refit"}
    b = {h["step"]: h["train_loss"] for h in trace.get("history", []) if h.get("phase") != "refit"}
    common = sorted(a.keys() & b.keys())
    if not common:
        return False, "no evaluation in common with the main run"
    same = all(a[k] == b[k] for k in common)
    word = "identical to" if same else "DIFFERENT from"
    return same, f"training loss {word} the main run's at {len(common)} evaluations"


def attach_reach(results: list[dict], traces: list[dict], target: float | None) -> None:
    """Give every result its time to reach ``target`` (Cornac: its fit time; ours: from its trace)."""
    by_key = {t["key"].removesuffix("-trace"): t for t in traces if "error" not in t}
    for r in results:
        if "error" in r:
            continue
        if r["key"] == "cornac":
            r["reach_seconds"] = r["fit_seconds"]
        elif target is not None and r["key"] in by_key:
            trace = by_key[r["key"]]
            step = r["reach_step"] = reach_step(trace, target)
            same, how = same_trajectory(r, trace)
            # the same trajectory: time the step on the main run's clock (as its fit time is); else the trace's
            main_time = seconds_at(r, step) if same and step is not None else None
            r["reach_seconds"] = main_time if main_time is not None else (
                seconds_at(trace, step) if step is not None else None)
            r["reach_clock"] = "main run" if main_time is not None else "trace run"
            best = min((h["test_rmse"] for h in trace["history"] if h["test_rmse"] is not None), default=None)
            r["trace_best_test_rmse"] = best
            r["reach_note"] = (f"trace: best test RMSE {best:.4f}, " + (
                f"target reached at step {step} (timed on the {r['reach_clock']}'s clock)"
                if step is not None else "target never reached") + f"; {how}")


def print_table(results: list[dict], target: float | None) -> None:
    """One line per contender, with ratios to Cornac measured in this run."""
    cornac = next((r for r in results if r["key"] == "cornac" and "error" not in r), None)
    base = cornac["fit_seconds"] if cornac else None
    print(f"\n{'contender':<22} {'test RMSE':>9} {'fit s':>8} {'wall s':>8} {'reach s':>8} {'peak MB':>8} "
          f"{'fit/Cornac':>10} {'reach/Cornac':>12} {'RMSE-Cornac':>11} {'load':>5}")
    for r in results:
        if "error" in r:
            print(f"{r['key']:<22} failed: {r['error']}")
            continue
        reach = r.get("reach_seconds")
        print(f"{r['name']:<22} {r['test_rmse']:9.4f} {r['fit_seconds']:8.2f} {r['wall_seconds']:8.2f} "
              f"{_fmt(reach, '8.2f'):>8} {r['peak_rss_mb']:8.0f} "
              f"{_fmt(base and r['fit_seconds'] / base, '10.2f'):>10} "
              f"{_fmt(base and reach and reach / base, '12.2f'):>12} "
              f"{_fmt(cornac and r['test_rmse'] - cornac['test_rmse'], '+11.4f'):>11} {r['load_at_start']:5.2f}")
    if target is not None:
        print(f"reach: first evaluation with test RMSE <= {target:.4f} (ours: from the labelled trace runs); "
              "load: 1-minute load average when the process started")


def _triggers(r: dict) -> str:
    return "" if r.get("ode_triggers") is None else f", {r['ode_triggers']} ODE triggers"


def print_details(results: list[dict]) -> None:
    """How each contender ran (ours: steps, path, loop time; peers: prep time, threads)."""
    for r in results:
        if "error" in r:
            continue
        if r["key"].startswith("ours"):
            flags = [f"{k}={v}" for k, v in r["settings"].items() if k != "seed"]
            how = f"train with {' '.join(flags)}" if flags else "train with no tuning flags"
            print(f"{r['name']}: {how} (lr {r.get('lr')}, reg {_fmt(r.get('reg'), '.4g')}), "
                  f"{r['representation']} on {r['device']}, "
                  f"{r['steps']} steps (best {r['best_step']}, {r['stopped']}), {r['grad_evals']} gradient "
                  f"evaluations{_triggers(r)}, training loop {r['loop_seconds']:.2f} s of fit "
                  f"{r['fit_seconds']:.2f} s, prep {_fmt(r.get('prep_seconds'), '.2f')} s (not in fit), imports "
                  f"{_fmt(r.get('import_seconds'), '.2f')} s (not in fit), predict {r['predict_seconds']:.2f} s"
                  + (f"; {r['reach_note']}" if r.get("reach_note") else ""))
            if r.get("path_choice"):
                print(f"  path chosen: {r['path_choice']}")
        else:
            print(f"{r['name']} {r['version']}: {r['settings']}; Dataset prep {r['prep_seconds']:.2f} s (not in "
                  f"fit){', ' + str(r['threads']) + ' threads' if 'threads' in r else ''}")
    ours = {r["key"]: r for r in results if r["key"].startswith("ours") and "error" not in r}
    for suffix, what in (("", "no tuning flags"), ("-set", "the settings given")):
        if {f"ours-default{suffix}", f"ours-adam{suffix}"} <= ours.keys():
            ratio = ours[f"ours-default{suffix}"]["fit_seconds"] / ours[f"ours-adam{suffix}"]["fit_seconds"]
            print(f"ours ({what}): default optimizer / adam fit time = {ratio:.2f}x")


def round_ratios(rounds: list[list[dict]]) -> dict[str, dict]:
    """Print and return, per contender, its fit time and fit/Cornac ratio in every round (each ratio
    taken against that round's Cornac run, just before or after it), and the median ratio: on a
    shared machine one round's ratio moves with the load, the median of alternated rounds less."""
    out: dict[str, dict] = {}
    print(f"\nfit time by round ({len(rounds)} rounds, contenders alternated):")
    for key in [r["key"] for r in rounds[0]]:
        fits, ratios = [], []
        for results in rounds:
            r = next((x for x in results if x["key"] == key and "error" not in x), None)
            cornac = next((x for x in results if x["key"] == "cornac" and "error" not in x), None)
            fits.append(None if r is None else r["fit_seconds"])
            ratios.append(None if r is None or cornac is None else r["fit_seconds"] / cornac["fit_seconds"])
        done = [x for x in ratios if x is not None]
        median = statistics.median(done) if done else None
        out[key] = {"fit_seconds": fits, "fit_over_cornac": ratios, "median_fit_over_cornac": median}
        print(f"  {key:<18} fit s " + " / ".join(_fmt(x, '.2f') for x in fits)
              + "; fit/Cornac " + " / ".join(_fmt(x, '.2f') for x in ratios) + f"; median {_fmt(median, '.2f')}")
    return out


# ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1m")
    ap.add_argument("--ratings", type=int, default=None, help="number of ratings (overrides --size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "recsys_flowadam_bench_scale",
                    help="data files, logs and results (default: <tmp>/recsys_flowadam_bench_scale)")
    ap.add_argument("--peer-python", default=None, help="python of an environment with cornac and lenskit")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for every contender; 0: each one's choice")
    ap.add_argument("--only", default="cornac,lenskit,ours-default,ours-adam,ours-default-set,ours-adam-set",
                    help="comma-separated contenders to run (default all)")
    ap.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                    help="also run ours with these settings (contenders ours-default-set and ours-adam-set, "
                         "labelled with them: they are not train's defaults)")
    ap.add_argument("--no-trace", action="store_true", help="skip ours' time-to-reach measurement runs")
    ap.add_argument("--target-rmse", type=float, default=None, help="reach target; default Cornac's RMSE + slack")
    ap.add_argument("--timeout", type=float, default=None, help="seconds allowed to each process (default none)")
    ap.add_argument("--reach-slack", type=float, default=0.002)
    ap.add_argument("--trace-margin", type=float, default=0.01,
                    help="no trace run for ours when its test RMSE is above the target by more than this")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the contenders this many times, in turn, and print every round's fit/Cornac ratios "
                         "and their median (the table shows round 1)")
    ap.add_argument("--generate-only", action="store_true", help="write the data files and stop")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start_load = os.getloadavg()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in start_load)}  ({os.cpu_count()} cores)")
    shape = problem_shape(args.ratings or SIZES[args.size])
    folder, meta = ensure_problem(args.out, shape, args.seed)
    print(f"problem: {meta['n_train']:,} train / {meta['n_test']:,} test ratings, {meta['users_with_ratings']:,} "
          f"users x {meta['items_with_ratings']:,} items, {meta['test_cold']:,} cold test ratings, rating mean "
          f"{meta['rating_mean']:.2f} sd {meta['rating_std']:.2f}, "
          f"noise-floor test RMSE {meta['noise_floor_test_rmse']:.4f}")
    if args.generate_only:
        return
    logs = args.out / "logs" / f"{shape.n_ratings}-seed{args.seed}"
    logs.mkdir(parents=True, exist_ok=True)
    runs, trace_runs = contenders(args)
    warm_up = warm_up_ours(logs, args) if any(c.script == "ours.py" for c in runs) else None
    results = [run_contender(c, folder, args, logs) for c in runs]
    later = [[run_contender(c, folder, args, logs) for c in runs] for _ in range(args.rounds - 1)]
    cornac = next((r for r in results if r["key"] == "cornac" and "error" not in r), None)
    target = args.target_rmse if args.target_rmse is not None else (
        cornac["test_rmse"] + args.reach_slack if cornac else None)
    traces = [run_contender(c, folder, args, logs) for c in worth_tracing(trace_runs, results, target, args)]
    attach_reach(results, traces, target)
    print_table(results, target)
    print_details(results)
    rounds = round_ratios([results, *later]) if later else None
    end_load = os.getloadavg()
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in end_load)}")
    report = {"problem": meta, "target_rmse": target, "results": results, "traces": traces,
              "load_start": start_load, "load_end": end_load, "rounds": rounds, "warm_up": warm_up}
    path = args.out / f"results-{shape.n_ratings}-seed{args.seed}-threads{args.threads}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
