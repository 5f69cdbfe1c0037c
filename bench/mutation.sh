#!/usr/bin/env bash
# Mutation testing (mutmut 3) of the numerical core: optim/, models/, train/metrics.py and the
# trainer modules, each mutant run against the test files that exercise it ([tool.mutmut] in
# pyproject.toml). A surviving mutant is a one-line bug that no test notices.
#
#   bench/mutation.sh                               # every mutant in scope (~5400: half a day on 2 cores)
#   bench/mutation.sh 'recsys_flowadam.optim.ode.*' # only the mutants whose names match (globs)
#
# Needs the `mutation` extra (pip install -e '.[mutation]'). It works in a scratch copy of the
# source and tests (MUTATION_DIR, default $TMPDIR/recsys-flowadam-mutation, recreated each run; a
# folder this script did not make is refused), so the checkout is never touched; MUTATION_CHILDREN (default 1) mutants are tested at once. At the
# end it prints the score (killed / tested) and the surviving mutants, and writes their diffs to
# $MUTATION_DIR/survivors.diff; `cd $MUTATION_DIR && mutmut show NAME` shows one of them.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
work=${MUTATION_DIR:-${TMPDIR:-/tmp}/recsys-flowadam-mutation}
children=${MUTATION_CHILDREN:-1}
if ! command -v mutmut >/dev/null; then
    echo "mutation.sh: mutmut not found; install it with: pip install -e '.[mutation]'" >&2
    exit 2
fi

marker=.recsys-flowadam-mutation
if [ -e "$work" ] && [ ! -e "$work/$marker" ]; then
    echo "mutation.sh: $work exists and was not made by this script; choose another MUTATION_DIR" >&2
    exit 2
fi
rm -rf "$work"
mkdir -p "$work"
touch "$work/$marker"
tar -C "$root" --exclude=__pycache__ -cf - recsys_flowadam tests pyproject.toml | tar -xf - -C "$work"
cd "$work"

# If mutmut stops early (e.g. the tests fail on the unmutated code), so does this script (set -e).
mutmut run --max-children "$children" "$@"

mutmut results --all true >results.txt
python - "$@" <<'EOF'
"""Score and survivors from `mutmut results --all true` ("    <mutant>: <status>" lines)."""
import collections
import fnmatch
import os
import subprocess
import sys

patterns = sys.argv[1:]
status = {}
for line in open("results.txt", encoding="utf-8"):
    name, sep, state = line.strip().rpartition(": ")
    if sep and (not patterns or any(fnmatch.fnmatch(name, p) for p in patterns)):
        status[name] = state
tested = {n: s for n, s in status.items() if s not in ("not checked", "skipped")}
counts = collections.Counter(tested.values())
caught = counts["killed"] + counts["timeout"] + counts["caught by type check"]
total = len(tested)
print(f"\nmutation score: {caught} killed / {total} tested ({100 * caught / max(total, 1):.1f}%)")
print("  " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
missed = sorted(n for n, s in tested.items() if s in ("survived", "no tests", "suspicious"))
print(f"surviving mutants ({len(missed)}):")
with open("survivors.diff", "w", encoding="utf-8") as out:
    for name in missed:
        print(f"  {name}: {tested[name]}")
        shown = subprocess.run(["mutmut", "show", name], capture_output=True, text=True)
        out.write(shown.stdout + "\n")
print(f"their diffs: {os.getcwd()}/survivors.diff")
EOF
