"""Optional API-key auth and CORS, on a real server."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from service.config import Settings
from tests.service.conftest import serve

KEY = "s3cret-key-1"


def test_without_keys_there_is_no_auth_and_no_cors(trained_bundle: Path):
    with serve(trained_bundle) as server:
        response = httpx.post(
            f"{server.url}/predict",
            json={"inputs": "great"},
            headers={"Origin": "https://elsewhere.example"},
        )
        assert response.status_code == 200
        assert "access-control-allow-origin" not in response.headers


def test_api_keys_guard_everything_but_the_exempt_paths(trained_bundle: Path, tmp_path: Path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# rotated 2026-11\nfrom-file-key\n")
    with serve(trained_bundle, api_keys=KEY, api_keys_file=keys_file) as server:
        url = f"{server.url}/predict"
        body = {"inputs": "great"}
        missing = httpx.post(url, json=body)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error_type"] == "unauthorized"
        wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer not-the-key"})
        assert wrong.status_code == 401
        assert KEY not in wrong.text
        basic = httpx.post(url, json=body, headers={"Authorization": f"Basic {KEY}"})
        assert basic.status_code == 401
        for key in (KEY, "from-file-key"):
            ok = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200
        for path in ("/health", "/ready", "/metrics"):
            assert httpx.get(f"{server.url}{path}").status_code == 200
        assert httpx.get(f"{server.url}/info").status_code == 401

        from huggingface_hub import InferenceClient

        client = InferenceClient(model=url, token=KEY)
        assert {c.label for c in client.text_classification("great")} == {"POSITIVE", "NEGATIVE"}


def test_exemptions_are_configurable(trained_bundle: Path):
    with serve(trained_bundle, api_keys=KEY, auth_exempt_paths="/health") as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.get(f"{server.url}/metrics").status_code == 401


def test_cors_only_for_configured_origins(trained_bundle: Path):
    origin = "https://app.example"
    with serve(trained_bundle, cors_origins=origin, api_keys=KEY) as server:
        preflight = httpx.options(
            f"{server.url}/predict",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == origin
        other = httpx.options(
            f"{server.url}/predict",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in other.headers


def test_keys_file_problems_are_refused_at_start(tmp_path: Path):
    with pytest.raises(ValidationError, match="api_keys_file"):
        Settings(api_keys_file=tmp_path / "absent")
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValidationError, match="holds no key"):
        Settings(api_keys_file=tmp_path / "empty")
    assert "s3cret" not in repr(Settings(api_keys="s3cret"))
