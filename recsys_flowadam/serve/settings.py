"""Service settings, read from keyword arguments or ``RECSYS_FLOWADAM_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# Limits that shape the request schemas (and therefore the OpenAPI document) are constants;
# the ones an operator tunes per deployment are settings.
MAX_ID_LENGTH = 256
MAX_K = 1000


class Settings(BaseSettings):
    """Configuration of one service process (each uvicorn worker builds its own)."""

    model_config = SettingsConfigDict(env_prefix="RECSYS_FLOWADAM_", extra="ignore")

    artifact_dir: Path | None = Field(
        default=None, description="Artifact folder loaded at start-up; unset = start without a model (/ready is 503)."
    )
    max_pairs: int = Field(default=10_000, ge=1, description="Most pairs one POST /v1/predict may carry (413 above).")
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="Larger request bodies are refused (413)."
    )
    admin_token: SecretStr | None = Field(
        default=None, description="Bearer token for /v1/admin/*; unset = admin endpoints answer 404."
    )
    topk_threads: int = Field(default=1, ge=0, description="Threads for implicit's top-k per request (0 = all cores).")
