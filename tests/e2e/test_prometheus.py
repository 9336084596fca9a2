"""A real Prometheus scraping a real laneswitch, and the shipped Prometheus files.

The integration test starts Debian's `prometheus` on loopback (a free port, a temporary storage
directory) with the shipped scrape job (deploy/prometheus/prometheus.yml: bearer token from a
file) and the shipped alerting rules, scraping every second; `laneswitch run` in its own process
in front of two upstreams with a 75/25 split; and asks Prometheus' HTTP query API what it saw.
It is skipped only when the `prometheus` binary is missing (`.ci/run` installs it).

The files are checked with `promtool check config`, `promtool check rules` and the rules' unit
tests (`promtool test rules deploy/prometheus/laneswitch-rules.test.yml`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.test_deploy_grafana import METRIC_NAME, dashboard_queries
from tests.helpers import ROOT, Client, RecordingUpstream, get, spawn_laneswitch

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
TOKEN = "prometheus-test-token"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return found


def run_promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------------------------
# The shipped files
# --------------------------------------------------------------------------------------------


def test_alerting_rules_pass_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", "laneswitch-rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {
        rule["alert"]
        for group in yaml.safe_load((PROMETHEUS_DIR / "laneswitch-rules.yml").read_text())["groups"]
        for rule in group["rules"]
    }
    assert {
        "LaneswitchCanaryErrorRateHigh",
        "LaneswitchRollback",
        "LaneswitchConfigReloadFailing",
        "LaneswitchFleetStoreDown",
        "LaneswitchFleetNoLeader",
        "LaneswitchFleetLeaderChanges",
        "LaneswitchFleetMembersPending",
    } <= alerts


def test_alerting_rules_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", "laneswitch-rules.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def config_dir_with_token(tmp_path: Path, config: str) -> Path:
    """A copy of deploy/prometheus/ as it is laid out on a Prometheus server, with the token file
    the scrape job reads (relative to the config file)."""
    for name in ("laneswitch-rules.yml", config):
        shutil.copy(PROMETHEUS_DIR / name, tmp_path / name)
    token = tmp_path / "secrets" / "laneswitch-admin" / "token"
    token.parent.mkdir(parents=True)
    token.write_text(TOKEN)
    return tmp_path


def test_scrape_config_passes_promtool_check_config(tmp_path: Path) -> None:
    directory = config_dir_with_token(tmp_path, "prometheus.yml")
    result = run_promtool("check", "config", "prometheus.yml", cwd=directory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_kubernetes_scrape_config_passes_promtool_check_config(tmp_path: Path) -> None:
    directory = config_dir_with_token(tmp_path, "prometheus-kubernetes.yml")
    path = directory / "prometheus-kubernetes.yml"
    result = run_promtool("check", "config", path.name, cwd=directory)
    if "field kubernetes_sd_configs not found" in result.stdout + result.stderr:
        # Debian builds Prometheus without Kubernetes discovery. Check everything else of the
        # job (token, relabelling, rules) with the discovery swapped for a static target.
        config = yaml.safe_load(path.read_text())
        for job in config["scrape_configs"]:
            sd = job.pop("kubernetes_sd_configs")
            assert sd == [{"role": "pod"}]
            job["static_configs"] = [{"targets": ["127.0.0.1:9901"]}]
        path.write_text(yaml.safe_dump(config))
        result = run_promtool("check", "config", path.name, cwd=directory)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------
# The integration test
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def stop_process(process: asyncio.subprocess.Process, timeout: float = 10) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()


class Laneswitch:
    """`laneswitch run` in its own process; its log is collected for failure messages."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.log: list[str] = []
        self.data_port = 0
        self.admin_port = 0
        self._reader: asyncio.Task[None] | None = None

    async def started(self, timeout: float = 20) -> None:
        assert self.process.stderr is not None
        async with asyncio.timeout(timeout):
            while not (self.data_port and self.admin_port):
                line = (await self.process.stderr.readline()).decode()
                if not line:
                    raise AssertionError("laneswitch exited:\n" + "".join(self.log))
                self.log.append(line)
                if match := re.search(r"admin API on [\d.]+:(\d+)", line):
                    self.admin_port = int(match[1])
                if match := re.search(r"listening on [\d.]+:(\d+)", line):
                    self.data_port = int(match[1])
        self._reader = asyncio.create_task(self._read_log())

    async def _read_log(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.log.append(line.decode())

    async def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Call the admin API with the token; (status, JSON answer)."""

        def call() -> tuple[int, Any]:
            request = urllib.request.Request(
                f"http://127.0.0.1:{self.admin_port}{path}",
                method=method,
                headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
                data=None if body is None else json.dumps(body).encode(),
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as answer:
                    return answer.status, json.loads(answer.read() or b"null")
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read() or b"null")

        return await asyncio.to_thread(call)

    async def stop(self) -> None:
        await stop_process(self.process)
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)


@contextlib.asynccontextmanager
async def laneswitch(config: Path) -> AsyncIterator[Laneswitch]:
    process = await spawn_laneswitch(
        "run", "-c", str(config), env={**os.environ, "LANESWITCH_ADMIN_TOKEN": TOKEN}
    )
    proxy = Laneswitch(process)
    try:
        await proxy.started()
        yield proxy
    finally:
        await proxy.stop()


class Prometheus:
    def __init__(self, process: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log

    def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    async def get(self, path: str, params: dict[str, str] | None = None) -> Any:
        return await asyncio.to_thread(self._get, path, params)

    async def query(self, expr: str) -> list[dict[str, Any]]:
        answer = await self.get("/api/v1/query", {"query": expr})
        assert answer["status"] == "success", f"{expr}: {answer}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    async def ready(self, timeout: float = 30) -> None:
        def is_ready() -> bool:
            try:
                url = f"http://127.0.0.1:{self.port}/-/ready"
                with urllib.request.urlopen(url, timeout=1) as answer:
                    return bool(answer.status == 200)
            except OSError:
                return False

        async with asyncio.timeout(timeout):
            while not await asyncio.to_thread(is_ready):
                if self.process.returncode is not None:
                    raise AssertionError("prometheus exited:\n" + self.log.read_text()[-3000:])
                await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def prometheus(directory: Path, admin_port: int) -> AsyncIterator[Prometheus]:
    """Prometheus with the shipped job pointed at `admin_port`, every second, and a second job
    that scrapes without the token (it must fail)."""
    binary = shutil.which("prometheus")
    assert binary is not None
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{admin_port}"]}]
    anonymous = {
        "job_name": "laneswitch-without-token",
        "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}],
    }
    config["scrape_configs"].append(anonymous)
    config_dir_with_token(directory, "laneswitch-rules.yml")  # rules and the token file
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log = directory / "prometheus.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            cwd=directory,
            stdout=out,
            stderr=out,
        )
    server = Prometheus(process, port, log)
    try:
        await server.ready()
        yield server
    finally:
        await stop_process(process)


async def send_traffic(port: int, stop: asyncio.Event, counts: dict[str, int]) -> None:
    client = await Client.connect(port)
    try:
        while not stop.is_set():
            response = await client.request(get())
            assert response.status == 200
            version = (response.header("X-App-Version") or b"").decode()
            counts[version] = counts.get(version, 0) + 1
            await asyncio.sleep(0.002)  # a steady few hundred requests per second
    finally:
        await client.close()


@pytest.mark.timeout(150)
async def test_prometheus_sees_the_configured_split(tmp_path: Path) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("the prometheus binary is missing (Debian: apt-get install prometheus)")
    blue = await RecordingUpstream("blue").start()
    green = await RecordingUpstream("green").start()
    config = tmp_path / "laneswitch.yaml"
    good_config = f"""
listen: 127.0.0.1:0
admin:
  listen: 127.0.0.1:0
  token: ${{LANESWITCH_ADMIN_TOKEN}}
drain_timeout: 1s
services:
  shop:
    versions:
      blue: {{endpoints: ["{blue.endpoint}"], weight: 75}}
      green: {{endpoints: ["{green.endpoint}"], weight: 25}}
    version_header: X-App-Version
"""
    config.write_text(good_config)
    stop = asyncio.Event()
    counts: dict[str, int] = {}
    traffic: asyncio.Task[None] | None = None
    try:
        async with laneswitch(config) as proxy:
            prom_dir = tmp_path / "prometheus"
            prom_dir.mkdir()
            async with prometheus(prom_dir, proxy.admin_port) as prom:
                traffic = asyncio.create_task(send_traffic(proxy.data_port, stop, counts))
                await check_split(prom)
                assert counts["blue"] > 0 and counts["green"] > 0
                assert abs(counts["blue"] / (counts["blue"] + counts["green"]) - 0.75) < 0.01

                # The scrape needs the token: the same target without it is down (401).
                assert await value(prom, 'up{job="laneswitch"}') == 1
                assert await value(prom, 'up{job="laneswitch-without-token"}') == 0

                await check_dashboard_queries(prom)

                # A rejected reload fires the shipped alert.
                config.write_text(good_config.replace("weight: 25", "weight: 30"))
                status, _ = await proxy.admin("POST", "/reload")
                assert status == 400, "".join(proxy.log)
                await wait_for_alert(prom, "LaneswitchConfigReloadFailing")
                config.write_text(good_config)
                stop.set()
                await traffic
    finally:
        stop.set()
        if traffic is not None and not traffic.done():
            traffic.cancel()
            with contextlib.suppress(BaseException):
                await traffic
        await blue.stop()
        await green.stop()


async def value(prom: Prometheus, expr: str) -> float:
    result = await prom.query(expr)
    assert len(result) == 1, f"{expr}: {result}"
    return float(result[0]["value"][1])


async def check_split(prom: Prometheus, timeout: float = 45) -> None:
    """`sum by (version) (rate(laneswitch_requests_total[...]))` shows 75/25, within 3 points."""
    expr = (
        'sum by (version) (rate(laneswitch_requests_total{job="laneswitch", service="shop"}[5s]))'
    )
    rates: dict[str, float] = {}
    try:
        async with asyncio.timeout(timeout):
            while True:
                result = await prom.query(expr)
                rates = {item["metric"]["version"]: float(item["value"][1]) for item in result}
                total = sum(rates.values())
                both = set(rates) == {"blue", "green"} and total > 0
                if both and abs(rates["blue"] / total - 0.75) < 0.03:
                    return
                await asyncio.sleep(0.5)  # the next scrape is a second away
    except TimeoutError:
        raise AssertionError(f"{expr} never showed 75/25: {rates}") from None


async def check_dashboard_queries(prom: Prometheus) -> None:
    """Every dashboard query runs; those on exported metrics return data."""
    names = set((await prom.get("/api/v1/label/__name__/values"))["data"])
    # Queries that filter with a comparison may be empty on healthy traffic, by design.
    filtered = re.compile(r"(==|>|<)\s*[\d.]+\s*$")
    empty = []
    for where, expr in dashboard_queries():
        result = await prom.query(expr)
        exported = all(name in names for name in METRIC_NAME.findall(expr))
        if exported and not result and not filtered.search(expr):
            empty.append((where, expr))
    assert not empty, f"dashboard queries without data: {empty}"


async def wait_for_alert(prom: Prometheus, name: str, timeout: float = 30) -> None:
    alerts: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                alerts = (await prom.get("/api/v1/alerts"))["data"]["alerts"]
                if any(a["labels"]["alertname"] == name and a["state"] == "firing" for a in alerts):
                    return
                await asyncio.sleep(0.5)  # rules are evaluated every second
    except TimeoutError:
        raise AssertionError(f"{name} never fired: {alerts}") from None
