"""The `fleet` block: its defaults, its validation errors, the summary of `laneswitch check`,
and that a config without it never needs Redis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.config import summarize
from tests.helpers import ROOT
from tests.unit.test_config import dump, errors, load, minimal

FLEET: dict[str, Any] = {"redis": "redis://127.0.0.1:6379/0", "name": "shop-ingress"}


def test_defaults(tmp_path: Path) -> None:
    fleet = load(tmp_path, dump(minimal(fleet=FLEET))).fleet
    assert fleet is not None
    assert fleet.model_dump() == {
        "redis": "redis://127.0.0.1:6379/0",
        "name": "shop-ingress",
        "member": None,
        "lease": 5.0,
        "ack_timeout": 2.0,
    }


def test_no_fleet_block_means_a_fleet_of_one(tmp_path: Path) -> None:
    assert load(tmp_path, dump(minimal())).fleet is None


def test_member_from_the_environment_and_empty_means_hostname_pid(tmp_path: Path) -> None:
    text = dump(minimal(fleet={**FLEET, "member": "${POD_NAME:-}", "lease": "2s"}))
    fleet = load(tmp_path, text, env={"POD_NAME": "shop-7f9c-x2"}).fleet
    assert fleet is not None and fleet.member == "shop-7f9c-x2" and fleet.lease == 2.0
    fleet = load(tmp_path, text, env={}).fleet
    assert fleet is not None and fleet.member is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"redis": "http://127.0.0.1:6379"}, "fleet.redis: must be a redis://"),
        ({"redis": "redis://127.0.0.1:x/0"}, "fleet.redis: the port must be a number"),
        ({"redis": "redis://127.0.0.1:6379/db"}, "fleet.redis: the database"),
        ({"name": "a b"}, "fleet.name:"),
        ({"member": "pod/1"}, "fleet.member: letters, digits"),
        ({"lease": "100ms"}, "fleet.lease:"),
        ({"ack_timeout": 0}, "fleet.ack_timeout:"),
        ({"leader": True}, "fleet.leader:"),
    ],
)
def test_invalid(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    found = errors(tmp_path, dump(minimal(fleet={**FLEET, **change})))
    assert len(found) == 1 and found[0].startswith(message), found


def test_redis_and_name_are_required(tmp_path: Path) -> None:
    found = errors(tmp_path, dump(minimal(fleet={})))
    assert sorted(line.split(":")[0] for line in found) == ["fleet.name", "fleet.redis"]


def test_summary_names_the_store_without_its_password(tmp_path: Path) -> None:
    fleet = {**FLEET, "redis": "redis://:s3cret@10.0.0.5:6380/2", "member": "m1"}
    text = summarize(load(tmp_path, dump(minimal(fleet=fleet))))
    assert "fleet: shop-ingress at redis://10.0.0.5:6380/2, member m1, lease 5s" in text
    assert "s3cret" not in text


def test_a_config_without_fleet_never_imports_redis(tmp_path: Path) -> None:
    """The redis client is loaded only by the fleet modules, so a fleet of one starts as fast
    as before and would run without the package."""
    path = tmp_path / "laneswitch.yaml"
    path.write_text(dump(minimal()), encoding="utf-8")
    code = (
        "import sys\n"
        "from proxy.config.loader import load_config\n"
        "import proxy.server, proxy.admin.app, proxy.cli\n"
        f"load_config({str(path)!r}, env={{}})\n"
        "assert 'redis' not in sys.modules, 'redis imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
