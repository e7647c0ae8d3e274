"""The README's examples, run against the shipped model served by `python -m service`: every
`curl` of its bash blocks (as written, on the test's port) must succeed, and where the README
shows the answer (the `#` lines under a command, the JSON block under the /explain example,
the /predict table), the answer must be what it shows, numbers as rounded there (within one
unit of the last digit shown) and `...` standing for anything. So the README cannot go stale
when the model changes."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.conftest import SHIPPED, service_process

README = Path(__file__).resolve().parents[2] / "README.md"
LOCAL = re.compile(r"(?:http://)?(?:localhost|127\.0\.0\.1):8000")


def bash_blocks(text: str) -> list[list[str]]:
    return [block.splitlines() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def examples(text: str) -> list[tuple[str, str | None]]:
    """Each `curl` to the service in the bash blocks (continuation lines and quotes spanning
    lines included) and the answer shown under it (the `#` lines that follow), if any."""
    found = []
    for lines in bash_blocks(text):
        i = 0
        while i < len(lines):
            if not (lines[i].startswith("curl") and LOCAL.search(lines[i])):
                i += 1
                continue
            command = lines[i]
            while command.endswith("\\") or _code(command).count("'") % 2:
                i += 1
                command += "\n" + lines[i]
            i += 1
            shown = []
            while i < len(lines) and lines[i].startswith("#"):
                shown.append(lines[i].lstrip("# ").rstrip())
                i += 1
            found.append((command, "".join(shown) or None))
    return found


def _code(command: str) -> str:
    """The command without its trailing comments (whose apostrophes are not quotes)."""
    return "\n".join(line.split("  #")[0] for line in command.splitlines())


def matches_shown(actual: str, shown: str) -> bool:
    """``actual`` (compact JSON) is what ``shown`` shows: `...` stands for any text."""
    pattern = ".*?".join(map(re.escape, shown.split("...")))
    return re.fullmatch(pattern, actual, re.S) is not None


def shown_json(text: str) -> Any:
    """A JSON example as shown: `...` in a list means "and more", numbers keep their text
    (so their shown rounding is known)."""
    text = re.sub(r",\s*\.\.\.\s*]", ', "..."]', text)
    return json.loads(text, parse_float=lambda s: ("number", s))


def agrees(actual: Any, shown: Any, where: str = "answer") -> None:
    """``shown`` is ``actual`` as the README rounds and abridges it: every key shown has its
    value, a list ending in "..." holds the shown items in order among others, a number equals
    the actual one rounded to the shown decimals."""
    if isinstance(shown, tuple):  # a number as written: within one unit of its last digit
        # (int8 scores move in the third decimal with the batch a text runs in)
        unit = 10.0 ** -len(shown[1].partition(".")[2])
        assert abs(actual - float(shown[1])) <= unit * 1.01, f"{where}: {actual} vs {shown[1]}"
    elif isinstance(shown, dict):
        for key, value in shown.items():
            assert key in actual, f"{where}: no {key}"
            agrees(actual[key], value, f"{where}.{key}")
    elif isinstance(shown, list) and shown and shown[-1] == "...":
        remaining = iter(actual)
        for item in shown[:-1]:
            for candidate in remaining:
                if candidate.get("text") == item.get("text"):
                    agrees(candidate, item, f"{where}[{item.get('text')}]")
                    break
            else:
                raise AssertionError(f"{where}: {item} not found in order")
    elif isinstance(shown, list):
        assert len(actual) == len(shown), where
        for i, (a, s) in enumerate(zip(actual, shown, strict=True)):
            agrees(a, s, f"{where}[{i}]")
    else:
        assert actual == shown, where


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with service_process(SHIPPED) as (_, served):
        yield served


def test_the_readme_shows_examples_with_their_answers():
    """If this fails, the parser below found nothing to check (a README reorganised under it)."""
    found = examples(README.read_text(encoding="utf-8"))
    assert len(found) >= 6
    assert sum(shown is not None for _, shown in found) >= 3


def test_every_curl_example_answers_as_the_readme_shows(url: str):
    """If this fails, a README example fails against the shipped model or shows an answer it
    no longer gives (as the previous model's 0.97 for "A joy." did)."""
    for command, shown in examples(README.read_text(encoding="utf-8")):
        run = LOCAL.sub(url, command).replace("curl -s", "curl -sS --fail-with-body", 1)
        result = subprocess.run(["bash", "-c", run], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        assert result.stdout.strip(), command
        if shown is not None:
            assert matches_shown(result.stdout.strip(), shown), f"{command}\n{result.stdout}"


def test_the_explanation_example_is_what_the_model_explains(url: str):
    text = README.read_text(encoding="utf-8")
    heading = text.index("### Explanations: `POST /explain`")
    block = re.search(r"```json\n(.*?)```", text[heading:], re.S)
    assert block is not None
    request = re.search(r"-d '(.*?)'", text[heading:]).group(1)  # type: ignore[union-attr]
    answer = httpx.post(f"{url}/explain", content=request, timeout=120).json()
    agrees(answer, shown_json(block.group(1)))


def test_the_predict_table_is_what_the_model_answers(url: str):
    text = README.read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\{\"inputs\".*?\})` \| `(\[\[.*?\]\])` \|$", text, re.M)
    assert len(rows) >= 3
    for request, shown in rows:
        answer = httpx.post(f"{url}/predict", content=request, timeout=30).json()
        agrees(answer, shown_json(shown), request)
