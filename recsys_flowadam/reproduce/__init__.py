"""Reproducing the FlowAdam paper's experiments, beside a fair comparison protocol (issue 6).

``run_experiment(name, ExperimentOptions(...), out_dir)`` runs one experiment (or ``all``) under
the ``paper`` and/or ``fair`` protocol and writes ``<out>/<experiment>.md``, ``.json`` and PNG
learning curves. See ``protocols`` for what each protocol fixes and ``tuning`` for how a tuned
lr is chosen (a grid extended past its edges, with flags for what tuning did not settle).
"""

from recsys_flowadam.reproduce.compare import Scenario, compare, summarise, wilcoxon_vs
from recsys_flowadam.reproduce.experiments import EXPERIMENTS, ExperimentOptions, run_experiment
from recsys_flowadam.reproduce.protocols import PROTOCOLS, Contender, fair_tuned, paper_fixed
from recsys_flowadam.reproduce.report import write_report
from recsys_flowadam.reproduce.runner import RunResult, RunSpec, run_one
from recsys_flowadam.reproduce.tasks import Task, make_robust_matrix, robust_task, synthetic_task
from recsys_flowadam.reproduce.tuning import NO_EXTENSION, TuningPolicy, tune

__all__ = [
    "EXPERIMENTS", "ExperimentOptions", "run_experiment", "PROTOCOLS", "Contender", "fair_tuned", "paper_fixed",
    "Scenario", "compare", "summarise", "wilcoxon_vs", "write_report", "RunResult", "RunSpec", "run_one", "Task",
    "make_robust_matrix", "robust_task", "synthetic_task", "TuningPolicy", "NO_EXTENSION", "tune",
]
