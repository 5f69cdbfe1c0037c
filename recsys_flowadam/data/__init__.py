"""The dataset layer: MovieLens and Jester loaders, synthetic problems, user CSVs, splits.

Every loader returns one ``Ratings``. ``load_dataset(name)`` reads the official files under
the data root (``resolve_data_dir``) and never downloads: ``download.fetch`` (``recsys-flowadam
data fetch NAME``) does; ``split_ratings`` makes seeded, reproducible train/val/test splits.
"""

from .errors import DataError
from .loader import load_dataset
from .paths import resolve_cache_dir, resolve_data_dir
from .ratings import Ratings, RatingScale
from .registry import DATASETS, DatasetEntry
from .splits import Split, split_ratings
from .synthetic import SyntheticProblem, make_low_rank_matrix, make_low_rank_tensor

__all__ = [
    "DATASETS",
    "DataError",
    "DatasetEntry",
    "Ratings",
    "RatingScale",
    "Split",
    "SyntheticProblem",
    "load_dataset",
    "make_low_rank_matrix",
    "make_low_rank_tensor",
    "resolve_cache_dir",
    "resolve_data_dir",
    "split_ratings",
]
