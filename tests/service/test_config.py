from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_documented_in_the_readme():
    text = README.read_text(encoding="utf-8")
    for name in Settings.model_fields:
        assert f"`SENTIMENT_{name.upper()}`" in text, name


def test_environment_variables_are_read_and_validated(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SENTIMENT_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("SENTIMENT_MODEL_DIR", "/srv/models")
    settings = Settings()
    assert settings.max_batch_size == 16
    assert settings.bundle_dir == Path("/srv/models/imdb-bigru")
    monkeypatch.setenv("SENTIMENT_MAX_WAIT_MS", "-1")
    with pytest.raises(ValidationError, match="max_wait_ms"):
        Settings()


@pytest.mark.parametrize("name", ["SENTIMENT_INFERENCE_WORKERS", "SENTIMENT_MAX_BACH_SIZE"])
def test_a_variable_that_names_no_setting_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, name: str
):
    """If this fails, a typo, or a lever that is no longer a setting (the scheduler's), is
    silently ignored and the operator believes it applies."""
    monkeypatch.setenv(name, "3")
    with pytest.raises(ValidationError, match=f"{name}: no such setting"):
        Settings()
