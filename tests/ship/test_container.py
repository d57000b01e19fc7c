"""The Dockerfile, without a Docker daemon (this machine and CI have none): its rules are checked as
written (non-root, one exec-form process, a HEALTHCHECK on /healthz, the CI's torch pin), and its install
and start commands are run here as the file says, in a fresh virtual environment: lmops built as a wheel
and installed non-editable (what `pip install .` in the image does; package data a wheel could miss, such
as the store's migrations, is exercised), `lmops init` of the image's workspace, then the ENTRYPOINT + CMD
serving a bundle, probed with the HEALTHCHECK's own command. Not run: the base image and the PyTorch
index download (the fresh environment borrows this one's installed dependencies)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from serve.conftest import alphabet_tokenizer, free_port, save_model, table_model

ROOT = Path(__file__).parents[2]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        word, _, rest = whole.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stage(path: Path, name: str) -> list[tuple[str, str]]:
    """The instructions of one build stage (FROM ... AS name up to the next FROM)."""
    out, inside = [], False
    for word, rest in instructions(path):
        if word == "FROM":
            inside = rest.lower().endswith(f" as {name}")
            continue
        if inside:
            out.append((word, rest))
    return out


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list), f"not exec form: {rest}"
    return value


def test_the_dockerfile_runs_one_non_root_process_with_a_healthcheck_and_the_ci_torch_pin():
    runtime = stage(ROOT / "Dockerfile", "runtime")
    words = [w for w, _ in runtime]
    users = [r for w, r in runtime if w == "USER"]
    assert users and users[-1] not in ("root", "0"), "the server must not run as root"
    assert words.index("USER") < words.index("ENTRYPOINT")
    entry = exec_form(dict(runtime)["ENTRYPOINT"])  # exec form: lmops is PID 1 and gets SIGTERM to drain
    assert entry[:2] == ["lmops", "serve"] and "0.0.0.0" in entry
    health = dict(runtime)["HEALTHCHECK"]
    assert "/healthz" in health and "CMD" in health
    args = {m[1]: m[2] for m in re.finditer(r"ARG (\w+)=(\S+)", "\n".join(f"{w} {r}" for w, r in runtime))}
    ci = (ROOT / ".ci" / "run").read_text()
    assert args["TORCH"] in ci, "the image pins the torch the CI installs"
    assert args["TORCH_INDEX"].endswith("/cpu"), "CPU by default; CUDA by --build-arg TORCH_INDEX"
    baked = stage(ROOT / "Dockerfile", "baked")
    assert any(w == "COPY" and r.split()[-1].rstrip("/") == "/model" for w, r in baked)


@pytest.mark.slow
def test_the_dockerfiles_install_and_start_commands_serve_a_bundle(tmp_path):
    runtime = dict(stage(ROOT / "Dockerfile", "runtime"))
    runs = [r for w, r in stage(ROOT / "Dockerfile", "runtime") if w == "RUN"]
    install = next(r for r in runs if "pip install" in r)
    assert 'pip install ".[postgres]"' in install  # non-editable: the wheel is what runs
    # a fresh environment with lmops from a wheel; the dependencies are borrowed from this one
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(ROOT)], check=True, timeout=300)
    wheel = next(wheels.glob("lmops-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "-q", str(wheel)], check=True, timeout=300)
    lmops = venv / "bin" / "lmops"
    where = subprocess.run([venv / "bin" / "python", "-c", "import lmops; print(lmops.__file__)"], capture_output=True,
                           text=True, check=True, cwd=tmp_path).stdout
    assert str(ROOT) not in where and "site-packages" in where, where  # the wheel's copy, not this checkout
    home = tmp_path / "home"
    env_line = runtime["ENV"]
    env = {**os.environ, **dict(kv.split("=", 1) for kv in shlex.split(env_line)), "HOME": str(home)}
    env["LMOPS_WORKSPACE"] = env["LMOPS_WORKSPACE"].replace("/home/lmops", str(home))
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    init = next(r for r in runs if r.startswith("lmops init"))
    # every command runs outside this checkout, so that nothing imports it from the current folder
    subprocess.run(shlex.split(init.replace("/home/lmops", str(home))), env=env, check=True, timeout=120, cwd=tmp_path)
    # a bundle where the image expects it
    tok = alphabet_tokenizer()
    save_model(tmp_path / "model", table_model(tok), tok)
    bundle = tmp_path / "bundle"
    subprocess.run([lmops, "package", str(tmp_path / "model"), str(bundle)], env=env, check=True, timeout=120,
                   cwd=tmp_path)
    port = free_port()
    command = [a.replace("8000", str(port)) for a in exec_form(runtime["ENTRYPOINT"])] + \
        [a.replace("/model", str(bundle)) for a in exec_form(runtime["CMD"])]
    health = exec_form(runtime["HEALTHCHECK"].split(" CMD ", 1)[1])
    health = [a.replace("8000", str(port)) for a in health]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        while subprocess.run(health, env=env, capture_output=True, cwd=tmp_path).returncode != 0:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the HEALTHCHECK never passed"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends
        proc.wait(60)
    err = proc.stderr.read()
    assert "Traceback" not in err, err[-3000:]
    assert proc.returncode in (0, -signal.SIGTERM), (proc.returncode, err[-2000:])
