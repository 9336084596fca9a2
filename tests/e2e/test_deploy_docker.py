"""The container image, run as the image would run it, without a container engine.

No container engine runs on these machines, so this test replays the Dockerfile by hand:

- it reads the Dockerfile (FROM, ENV, WORKDIR, COPY, RUN, USER, EXPOSE, HEALTHCHECK,
  ENTRYPOINT, CMD) and the build context that `.dockerignore` lets through;
- it copies that context into a temporary "image root", does the COPY steps, creates a fresh
  virtualenv (standing in for the base image's Python) and runs the RUN step's `pip install .` in
  it, then deletes the source as the RUN step does, so the program runs from the installed
  package only;
- it writes a config at the path CMD names, mapped under the temporary root (`/etc/laneswitch/...`
  becomes `ROOT/etc/laneswitch/...`), and runs ENTRYPOINT + CMD with the venv first on PATH, the
  Dockerfile's ENV, WORKDIR as the working directory and, when the test runs as root, as the
  USER's uid/gid;
- it checks `/healthz`, runs the HEALTHCHECK command itself, sends a request through the data
  plane, and stops the process with SIGTERM as `docker stop` does (exit 0).

What this cannot reproduce: the `python:3.11-slim` base (the venv uses this machine's Python,
whatever its minor version), the image's filesystem isolation (the program could read files outside
the mapped root; absolute paths in CMD are rewritten to the root), running as PID 1, and Docker's
own port publishing: the config listens on loopback here, where a container config listens on
0.0.0.0. Whether `docker build` accepts the file is not checked beyond this parse.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, Client, RecordingUpstream, get

DOCKERFILE = ROOT / "Dockerfile"
TOKEN = "docker-test-token"


# --------------------------------------------------------------------------------------------
# Reading the Dockerfile and .dockerignore
# --------------------------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, args = pending.strip().partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return result


def exec_form(args: str) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT/CMD: a shell form would wrap the process in sh -c."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(item, str) for item in value), args
    return value


def env_pairs(args: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(args))


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex on a relative path."""
    pattern = pattern.strip("/")
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def build_context(root: Path) -> list[Path]:
    """Files Docker would send as the build context: the last matching pattern decides, and a
    pattern that matches a directory matches everything under it (Docker's rules)."""
    rules: list[tuple[bool, str, re.Pattern[str]]] = []
    for line in (root / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        text = line.lstrip("!").strip("/")
        rules.append((line.startswith("!"), text, _ignore_regex(text)))

    def excluded(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for include, _, regex in rules:
            if any(regex.fullmatch(prefix) for prefix in prefixes):
                result = not include
        return result

    def may_hold_included(rel: str) -> bool:
        # An excluded directory is skipped unless an exception ("!...") could reach inside it.
        return any(
            include and (text.startswith(rel + "/") or text.startswith(("*", "?", "[")))
            for include, text, _ in rules
        )

    files: list[Path] = []
    for current, dirs, names in os.walk(root):
        base = Path(current).relative_to(root)
        dirs[:] = sorted(
            d
            for d in dirs
            if d != ".git"
            and (not excluded((base / d).as_posix()) or may_hold_included((base / d).as_posix()))
        )
        files += [base / name for name in sorted(names) if not excluded((base / name).as_posix())]
    return files


# --------------------------------------------------------------------------------------------
# Static checks of the Dockerfile
# --------------------------------------------------------------------------------------------


def test_dockerfile_is_the_conventional_image() -> None:
    steps = instructions(DOCKERFILE.read_text())
    by_name: dict[str, list[str]] = {}
    for keyword, args in steps:
        by_name.setdefault(keyword, []).append(args)
    assert by_name["FROM"] == ["python:3.11-slim"]
    assert exec_form(by_name["ENTRYPOINT"][-1]) == ["laneswitch"]
    assert exec_form(by_name["CMD"][-1]) == ["run", "-c", "/etc/laneswitch/laneswitch.yaml"]
    assert set(by_name["EXPOSE"][-1].split()) == {"8080", "9901"}
    user = by_name["USER"][-1]
    assert user.split(":")[0] not in ("0", "root")
    # USER comes after the install, so the program cannot write to its own code.
    names = [keyword for keyword, _ in steps]
    assert names.index("USER") > max(i for i, (k, a) in enumerate(steps) if "pip install" in a)
    assert any(re.search(r"\bpip install \.(\s|$)", args) for args in by_name["RUN"])
    healthcheck = by_name["HEALTHCHECK"][-1]
    assert "/healthz" in healthcheck and "curl" not in healthcheck


def test_dockerignore_sends_only_the_package_source() -> None:
    context = {path.as_posix() for path in build_context(ROOT)}
    assert {"pyproject.toml", "README.md", "proxy/cli.py"} <= context
    assert not any(path.startswith(("tests/", ".git/", ".venv/", "deploy/")) for path in context)
    assert not any("__pycache__" in path or path.endswith(".pyc") for path in context)


# --------------------------------------------------------------------------------------------
# The image, replayed
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def image_root() -> Iterator[Path]:
    # Not pytest's tmp_path: its parents are 0700, and the USER must be able to enter this one.
    root = Path(tempfile.mkdtemp(prefix="laneswitch-image-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def mapped(root: Path, path: str) -> Path:
    return root / path.lstrip("/") if path.startswith("/") else Path(path)


def replay_build(root: Path, steps: list[tuple[str, str]]) -> tuple[Path, dict[str, str], Path]:
    """Do the build steps under `root`; return (venv bin dir, ENV, final WORKDIR)."""
    context = root / "context"
    for rel in build_context(ROOT):
        target = context / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    venv = root / "usr" / "local"  # the base image's Python lives in /usr/local
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env: dict[str, str] = {}
    workdir = root
    for keyword, args in steps:
        if keyword == "ENV":
            env.update(env_pairs(args))
        elif keyword == "WORKDIR":
            workdir = mapped(root, args)
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, dest = shlex.split(args)
            assert not any(s.startswith("--") for s in sources), "COPY flags are not replayed"
            target = workdir / dest if not dest.startswith("/") else mapped(root, dest)
            for source in sources:
                found = context / source
                assert found.exists(), f"COPY {source}: not in the build context (.dockerignore)"
                if found.is_dir():
                    shutil.copytree(found, target, dirs_exist_ok=True)
                elif dest.endswith("/"):
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(found, target / found.name)
                else:
                    shutil.copy2(found, target)
        elif keyword == "RUN":
            for command in args.split("&&"):
                words = shlex.split(command)
                if words[:2] == ["pip", "install"]:
                    # The pip cache is allowed here (PIP_NO_CACHE_DIR only keeps the image small).
                    pip_env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
                    pip_env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
                    subprocess.run(
                        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *words[2:]],
                        cwd=workdir,
                        env=pip_env,
                        check=True,
                        timeout=300,
                    )
                elif words[:2] == ["rm", "-rf"]:
                    for path in words[2:]:
                        shutil.rmtree(mapped(root, path))
                elif words[:1] == ["mkdir"]:
                    for path in words[1:]:
                        if path.startswith("/"):
                            mapped(root, path).mkdir(parents=True, exist_ok=True)
                # groupadd/useradd/chown: users are replayed by running as the USER's uid below.
    return venv / "bin", env, workdir


@pytest.mark.timeout(300)
async def test_the_image_entrypoint_and_command_serve_healthz() -> None:
    steps = instructions(DOCKERFILE.read_text())
    entrypoint = exec_form(next(a for k, a in reversed(steps) if k == "ENTRYPOINT"))
    command = exec_form(next(a for k, a in reversed(steps) if k == "CMD"))
    user = next(a for k, a in reversed(steps) if k == "USER")
    healthcheck = next(a for k, a in reversed(steps) if k == "HEALTHCHECK")
    health_command = exec_form(healthcheck[healthcheck.index("CMD ") + 4 :])
    config_path = command[command.index("-c") + 1]

    upstream = await RecordingUpstream("app").start()
    with image_root() as root:
        bin_dir, image_env, workdir = await asyncio.to_thread(replay_build, root, steps)
        assert not (root / "src").exists(), "the source is removed after the install"
        data_port, admin_port = free_port(), free_port()
        config_file = mapped(root, config_path)
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(
            f"""
listen: 127.0.0.1:{data_port}
admin:
  listen: 127.0.0.1:${{LANESWITCH_ADMIN_PORT}}
  token: ${{LANESWITCH_ADMIN_TOKEN}}
drain_timeout: 2s
services:
  app:
    versions:
      v1: {{endpoints: ["{upstream.endpoint}"], weight: 100}}
    version_header: X-App-Version
"""
        )
        config_file.chmod(0o644)
        env = {
            "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(workdir),
            **image_env,
            "LANESWITCH_ADMIN_TOKEN": TOKEN,
            "LANESWITCH_ADMIN_PORT": str(admin_port),
        }
        as_user = run_as(user, bin_dir / "python", workdir)
        argv = [
            str(bin_dir / entrypoint[0]),
            *entrypoint[1:],
            *[str(mapped(root, a)) if a == config_path else a for a in command],
        ]
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=workdir, env=env, stderr=asyncio.subprocess.PIPE, **as_user
        )
        try:
            await wait_healthy(admin_port, process)
            # The image's own HEALTHCHECK command, with the image's python.
            check = await asyncio.create_subprocess_exec(
                str(bin_dir / health_command[0]), *health_command[1:], env=env, **as_user
            )
            assert await asyncio.wait_for(check.wait(), 10) == 0
            client = await Client.connect(data_port)
            response = await client.request(get())
            assert response.status == 200 and response.header("X-App-Version") == b"v1"
            await client.close()
            process.send_signal(signal.SIGTERM)  # what `docker stop` sends
            assert await asyncio.wait_for(process.wait(), 2 + 1 + 2) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await upstream.stop()


def run_as(user: str, python: Path, workdir: Path) -> dict[str, Any]:
    """Subprocess arguments that run a child as the image's USER, where that can be done here.

    Only root can switch users, and only an interpreter that user can reach can run: a Python
    installed under /root (pyenv) cannot. Then the child runs as the current user, with a warning.
    """
    if os.geteuid() != 0:
        warnings.warn("not root: the image's USER is not replayed", stacklevel=2)
        return {}
    uid, _, gid = user.partition(":")
    drop = functools.partial(become, int(uid), int(gid or uid))
    try:
        subprocess.run([str(python), "-c", "import proxy"], preexec_fn=drop, check=True, timeout=30)
    except (OSError, subprocess.CalledProcessError) as exc:
        warnings.warn(
            f"this Python cannot run as uid {uid} ({exc}): USER not replayed", stacklevel=2
        )
        return {}
    os.chown(workdir, int(uid), int(gid or uid))
    # uvloop has no user=/group= for subprocesses: drop privileges in the child.
    return {"preexec_fn": drop}


def become(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


async def wait_healthy(port: int, process: asyncio.subprocess.Process) -> None:
    def healthz() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as answer:
                return int(answer.status)
        except OSError:
            return 0

    async with asyncio.timeout(20):
        while await asyncio.to_thread(healthz) != 200:
            if process.returncode is not None:
                assert process.stderr is not None
                err = (await process.stderr.read()).decode()
                raise AssertionError(f"laneswitch exited with {process.returncode}:\n{err}")
            await asyncio.sleep(0.1)
