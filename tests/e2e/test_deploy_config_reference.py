"""docs/configuration.md, the configuration reference, is the output of scripts/config-reference
(generated from the config file's pydantic models), so it never drifts from the code."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT

SCRIPT = ROOT / "scripts" / "config-reference"


def reference() -> str:
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_configuration_reference_matches_the_models() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    start = doc.index("<!-- config-reference:start")
    start = doc.index("\n", start) + 1
    end = doc.index("<!-- config-reference:end -->")
    assert doc[start:end].strip("\n") == reference().strip("\n"), (
        "docs/configuration.md is out of date: run scripts/config-reference --write"
    )


def test_the_reference_lists_every_field_of_the_schema() -> None:
    from proxy.config.loader import config_schema

    table = reference()
    schema = config_schema()
    for name in schema["properties"]:
        assert f"| `{name}` |" in table
    for definition in schema["$defs"].values():
        for field in definition.get("properties", {}):
            assert f".{field}`" in table, field
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        assert len(cells) == 4 and cells[3], f"no meaning: {line}"
