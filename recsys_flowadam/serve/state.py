"""The currently served model and its atomic replacement."""

from __future__ import annotations

import gc
import threading
from dataclasses import dataclass
from pathlib import Path

from recsys_flowadam.artifact import Artifact, load_artifact
from recsys_flowadam.serve.schemas import ModelInfo
from recsys_flowadam.serve.scorer import Scorer


@dataclass(frozen=True)
class LoadedModel:
    """Everything a request needs from one artifact; immutable, so requests can hold it safely."""

    path: Path
    scorer: Scorer
    info: ModelInfo


def model_info(artifact: Artifact) -> ModelInfo:
    m = artifact.meta
    return ModelInfo(
        model_type=m.model_type,
        rank=m.rank,
        dataset={"name": m.dataset.name, "split": m.dataset.split, "seed": m.dataset.seed,
                 "source_files": m.dataset.source_files},
        rating_scale={"min": m.rating_scale.min, "max": m.rating_scale.max},
        n_users=m.n_users,
        n_items=m.n_items,
        n_contexts=m.n_contexts,
        global_mean=m.global_mean,
        metrics=m.metrics,
        created_at=m.created_at,
        optimizer=m.optimizer.model_dump(),
        train_config=m.train_config,
        versions=m.versions.model_dump(),
    )


class ModelHolder:
    """Holds the served model. Requests take ``holder.current`` once at their start (a reference
    to an immutable LoadedModel), so a reload never changes a model under a running request;
    the swap itself is one attribute assignment. Reloads are serialised by a lock."""

    def __init__(self, *, topk_threads: int = 1) -> None:
        self.current: LoadedModel | None = None
        self._topk_threads = topk_threads
        self._lock = threading.Lock()

    def load(self, path: str | Path) -> LoadedModel:
        """Load ``path`` completely, then swap it in; on any error the old model stays (ArtifactError)."""
        with self._lock:
            artifact = load_artifact(path)
            loaded = LoadedModel(path=Path(path), scorer=Scorer(artifact, num_threads=self._topk_threads),
                                 info=model_info(artifact))
            previous, self.current = self.current, loaded
            if previous is not None and gc.get_freeze_count():
                # the old model was frozen at start-up (see app._lifespan): release it, refreeze
                del previous
                gc.unfreeze()
                gc.collect()
                gc.freeze()
            return loaded
