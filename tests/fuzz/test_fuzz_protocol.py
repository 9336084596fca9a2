"""The data plane's fuzz target: its corpus replayed in the suite, and a bounded atheris run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuzz.harness import Runner

HERE = Path(__file__).parent
CORPUS = HERE / "corpus"
ROOT = HERE.parent.parent

# How long the atheris run lasts (CI: 60 s); docs/testing.md says how to run it longer.
FUZZ_SECONDS = int(os.environ.get("LANESWITCH_FUZZ_SECONDS", "60"))


@pytest.fixture(scope="module")
def runner() -> Iterator[Runner]:
    runner = Runner()
    yield runner
    runner.close()


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.iterdir()))
def test_corpus_input_keeps_every_invariant(runner: Runner, name: str) -> None:
    runner.one((CORPUS / name).read_bytes())


def test_corpus_covers_the_probes() -> None:
    # The seeds the fuzzer starts from: pipelining, bodies, smuggling probes, upgrades, HEAD,
    # trailers, and upstreams that overrun, stall, reset or end with the connection.
    names = {p.name for p in CORPUS.iterdir()}
    for needed in (
        "pipelined",
        "chunked-body",
        "smuggle-cl-te",
        "smuggle-te-cl",
        "upgrade",
        "head-with-body",
        "trailers",
        "extra-bytes-response",
        "close-delimited",
        "interim",
    ):
        assert needed in names


@pytest.mark.fuzz
@pytest.mark.timeout(FUZZ_SECONDS + 120)
def test_fuzzing_the_data_plane_finds_nothing(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    found = tmp_path / "found"
    found.mkdir()
    command = [
        sys.executable,
        str(HERE / "fuzz_protocol.py"),
        f"-max_total_time={FUZZ_SECONDS}",
        "-max_len=8192",
        "-timeout=20",
        f"-dict={HERE / 'http.dict'}",
        f"-artifact_prefix={tmp_path}/",
        str(found),  # new inputs go here, not into the repository's corpus
        str(CORPUS),
    ]
    run = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=FUZZ_SECONDS + 100
    )
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert run.returncode == 0 and not crashes, (
        f"the fuzzer found a failing input {crashes} (exit {run.returncode}):\n{run.stderr[-6000:]}"
    )
