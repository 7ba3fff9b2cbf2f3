"""W&B outages against real local servers: a port nobody listens on, a server that accepts and
never answers, one that answers HTTP 500 and one that answers nonsense (W&B's core then fails
mid-run). Each real `metalearn train` run goes on with its local logs, says so, and costs at
most a few seconds more than a run without W&B."""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = [
    "train",
    "debug=smoke",
    "hardware.threads=1",
    "trainer.iterations=20",
    "trainer.eval_every=10",
]
TIMEOUT = 2.0  # logger.timeout: how long the server has to answer at start-up


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Answering(http.server.BaseHTTPRequestHandler):
    status, body = 500, b"server error"

    def answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_POST = do_PUT = answer

    def log_message(self, *args) -> None:
        pass


class Nonsense(Answering):
    status, body = 200, b"{}"


def serve(kind: str):
    """(url, stop) of a local server behaving as `kind`."""
    if kind == "refused":
        return f"http://127.0.0.1:{free_port()}", lambda: None
    if kind == "silent":  # accepts connections, reads nothing, answers nothing
        listener = socket.create_server(("127.0.0.1", 0))
        held: list[socket.socket] = []
        done = threading.Event()

        def accept() -> None:
            listener.settimeout(0.2)
            while not done.is_set():
                try:
                    held.append(listener.accept()[0])
                except TimeoutError:
                    pass

        threading.Thread(target=accept, daemon=True).start()

        def stop() -> None:
            done.set()
            for connection in held:
                connection.close()
            listener.close()

        return f"http://127.0.0.1:{listener.getsockname()[1]}", stop
    handler = {"failing": Answering, "nonsense": Nonsense}[kind]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server.shutdown


def train(run_dir: Path, *extra: str, env: dict | None = None) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "metalearn.cli", *RUN, f"hydra.run.dir={run_dir}", *extra],
        cwd=REPO,
        env=os.environ | {"OMP_NUM_THREADS": "1"} | (env or {}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return time.monotonic() - started, done.stderr


@pytest.fixture(scope="module")
def offline(tmp_path_factory) -> tuple[float, list]:
    """A run logging to an offline W&B run: the time and metrics to compare with."""
    run_dir = tmp_path_factory.mktemp("offline")
    seconds, _ = train(run_dir, "logger=wandb", "logger.mode=offline")
    return seconds, [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        ("refused", "is unreachable"),
        ("silent", f"did not answer within {TIMEOUT:g} s"),
        ("failing", "answers HTTP 500"),
        ("nonsense", "failed"),  # the server looks alive; W&B's core fails once the run is on
        ("no-key", "wandb.init failed (UsageError"),  # alive, but this machine has no API key
    ],
)
def test_training_goes_on_with_local_logs_when_wandb_is_down(kind, said, offline, tmp_path, tally):
    url, stop = serve("nonsense" if kind == "no-key" else kind)
    env = {
        "WANDB_BASE_URL": url,
        "WANDB_API_KEY": "0" * 40,  # any key: the server is what fails
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "HOME": str(tmp_path / "home"),  # no ~/.netrc with a real key
    }
    if kind == "no-key":
        env["WANDB_API_KEY"] = ""
    try:
        seconds, stderr = train(
            tmp_path, "logger=wandb", "logger.mode=online", f"logger.timeout={TIMEOUT}", env=env
        )
    finally:
        stop()
    assert said in stderr
    assert "metrics.jsonl" in stderr  # where the local logs continue
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["train"]["iterations"] == 20
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [r["step"] for r in offline[1]]
    baseline = offline[0]
    assert seconds < baseline + 4 * TIMEOUT, f"{seconds:.1f} s against {baseline:.1f} s offline"
    if kind != "nonsense":  # W&B went offline at start-up: its run is kept for `wandb sync`
        assert "wandb sync" in stderr and list((tmp_path / "wandb").glob("offline-run-*"))
    tally["wandb"] += 1
