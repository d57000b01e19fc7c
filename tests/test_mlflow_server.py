"""MLflow as a team runs it: a real `mlflow server` process as lmops's tracking and registry URI, its
artifacts on Azure Blob Storage (Azurite, Microsoft's emulator, from npm), and the whole path through it:
the pipeline tracks, registers and promotes there, the server loads the champion back through it, and the
model's files are blobs in the container.

Azurite is installed by the test from the npm registry into a cache folder (the repository contract lets
a test install what it needs; nothing else here downloads), and skipped with the reason when node/npm
are missing or the install fails. Both processes are stopped after."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import TINY
from lmops.config import override

AZURITE_VERSION = "3.37.0"
ACCOUNT, KEY = "devstoreaccount1", ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
                                    "KBHBeksoGMGw==")  # Azurite's well-known development key
CONTAINER = "mlflow"
CACHE = Path(os.environ.get("LMOPS_TEST_CACHE", Path.home() / ".cache" / "lmops-tests"))

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.stdout.read() if proc.stdout and proc.poll() is not None else ""
            raise RuntimeError(f"{what} did not start: {out[-2000:]}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:  # Azurite closes its connections slowly on SIGTERM
        proc.kill()
        proc.wait(10)


def azurite_binary() -> Path:
    """azurite-blob from npm, installed once into the test cache."""
    folder = CACHE / f"azurite-{AZURITE_VERSION}"
    binary = folder / "node_modules" / ".bin" / "azurite-blob"
    if binary.exists():
        return binary
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("Azurite needs node and npm, which this machine lacks")
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["npm", "install", "--prefix", str(folder), "--no-audit", "--no-fund", "--silent",
                           f"azurite@{AZURITE_VERSION}"], capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not binary.exists():
        pytest.skip(f"could not install Azurite from npm: {(done.stderr or done.stdout)[-500:]}")
    return binary


@pytest.fixture(scope="module")
def blob(tmp_path_factory):
    """A running Azurite blob service with an empty container; yields its connection string."""
    pytest.importorskip("azure.storage.blob", reason="azure-storage-blob not installed (pip install -e '.[dev]')")
    from azure.storage.blob import BlobServiceClient

    port = free_port()
    proc = subprocess.Popen([str(azurite_binary()), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location",
                             str(tmp_path_factory.mktemp("azurite")), "--skipApiVersionCheck", "--loose"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    conn = (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};")
    try:
        wait_http(f"http://127.0.0.1:{port}/{ACCOUNT}?comp=list", proc, "Azurite")
        BlobServiceClient.from_connection_string(conn).create_container(CONTAINER)
        yield conn
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def mlflow_server(blob, tmp_path_factory):
    """`mlflow server` with its metadata in SQLite and its artifacts in the Azurite container."""
    pytest.importorskip("azure.identity", reason="MLflow's Azure Blob store needs azure-identity (dev extra)")
    port = free_port()
    folder = tmp_path_factory.mktemp("mlflow-server")
    env = {**os.environ, "AZURE_STORAGE_CONNECTION_STRING": blob}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
                             f"wasbs://{CONTAINER}@{ACCOUNT}.blob.core.windows.net/artifacts", "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=folder)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, "mlflow server", timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def test_pipeline_registry_and_serving_through_an_mlflow_server_with_blob_artifacts(workspace, mlflow_server, blob):
    import openai
    from azure.storage.blob import BlobServiceClient

    from lmops import registry
    from lmops.pipeline import run_pipeline
    from lmops.serve.app import create_app
    from lmops.serve.source import ModelSource
    from lmops.store import Store
    from serve.conftest import LiveServer

    ws = workspace
    cfg = override(ws.config(), [*TINY, f"tracking.tracking_uri={mlflow_server}", "registry.model_name=remote"])
    run_pipeline(ws, cfg, progress=False, log=lambda m: None)
    champion = registry.resolve(ws, cfg, "remote@champion")
    assert champion.version and champion.source.startswith(("models:/", "mlflow-artifacts:", "runs:/"))
    assert not (ws.state / "mlflow.db").exists(), "tracked locally instead of on the server"
    # the weights are blobs in the container, not files on this side
    names = [b.name for b in BlobServiceClient.from_connection_string(blob).get_container_client(CONTAINER).list_blobs()]
    assert any(n.endswith("ckpt.safetensors") for n in names), names[:20]
    # served back through the server: downloaded from the blobs, checked against the registered sha256
    with Store.for_workspace(ws, cfg) as store:
        _, secret = store.keys.create("remote", "inference", "tests")
        live = LiveServer(create_app(cfg, ModelSource(ws, cfg, "remote@champion"), store))
        try:
            client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=secret)
            answer = client.completions.create(model="remote", prompt="The ", max_tokens=4)
            assert answer.system_fingerprint == f"remote-v{champion.version}"
        finally:
            live.stop()
