"""The real deployment on loopback: ``fedmeta server`` and three ``fedmeta client`` processes, TLS and
SuperNode authentication on, each hospital a folder of synthetic DICOM files.

One scenario, run once for the module (about three minutes on two cores), then checked piece by piece:

1. the server and three hospitals train 2 rounds; a hospital whose key the server never registered
   is refused;
2. the server is started again on the same run folder for 4 rounds: it resumes after round 2, the
   still-running hospitals rejoin, one hospital is SIGKILLed after round 3 and round 4 completes with
   the other two;
3. the hospitals left are stopped with SIGTERM, like an operator would;
4. every train reply the server received held only the meta-parameters' names and shapes and the
   fixed metric keys, and no process the test started (Flower's included) is left.

Every process the test starts carries a marker in its environment, inherited by everything Flower
starts under it: that is how the test finds, kills and checks exactly its own processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from safetensors.numpy import load_file

from shared import cli
from shared.certs import CA_CERT, SERVER_CERT, SERVER_KEY, make_certs
from shared.errors import UserError
from shared.flower_processes import free_port, wait_until_gone
from shared.synthetic import write_synthetic_hospital
from shared.wire import GRADIENT_KEY, METRICS_KEY, TRAIN_METRICS

PROJECT = Path(__file__).resolve().parents[1]
MARKER = "FEDMETA_TEST_PROCESS"
HOSPITALS = ("h0", "h1", "h2")
RUN_CONFIG = [
    "privacy.enabled=false",
    "model.width=8",
    "maml.inner-steps=1",
    "episode.k-shot=2",
    "episode.q-query=4",
    "episode.meta-batch=2",
    "episode.eval-episodes=2",
    "server.fraction-evaluate=0",
    "server.capture-replies=true",
]
# Above a normal round here (about 20 s with three hospitals on two cores), and what the round after the
# kill waits for the dead hospital's reply.
ROUND_TIMEOUT_S = 40


class Processes:
    """``fedmeta`` commands started by this test, their output in files, and everything started under them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.token = secrets.token_hex(6)
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, label: str, *args: str) -> subprocess.Popen:
        env = {**os.environ, MARKER: f"{self.token}:{label}", "PYTHONUNBUFFERED": "1"}
        with open(self.folder / f"{label}.out", "w") as out, open(self.folder / f"{label}.err", "w") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", *args], stdout=out, stderr=err, cwd=PROJECT, env=env
            )
        self.started[label] = process
        return process

    def output(self, label: str) -> str:
        return (self.folder / f"{label}.out").read_text() + (self.folder / f"{label}.err").read_text()

    def wait_for_output(self, label: str, text: str, timeout_s: float) -> float:
        """Wait until ``text`` appears in the command's output; return the time it was seen."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.output(label):
                return time.monotonic()
            if self.started[label].poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail(f"{label} did not print {text!r}:\n{self.output(label)[-3000:]}")

    def wait(self, label: str, timeout_s: float) -> int:
        try:
            return self.started[label].wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{label} still running after {timeout_s}s:\n{self.output(label)[-3000:]}")

    def alive(self, label: str = "") -> list[psutil.Process]:
        """Live processes started by this test (under ``label`` when given), Flower's detached ones included."""
        prefix = f"{self.token}:{label}"
        found = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.environ().get(MARKER, "").startswith(prefix) and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
        return found

    def kill(self, label: str = "") -> None:
        for p in self.alive(label):
            with contextlib.suppress(psutil.Error):
                p.kill()
        for label_started, process in self.started.items():
            if label_started.startswith(label):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=10)


def program(p: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(Path(arg).name for arg in p.cmdline()[:4])
    return str(p.pid)


@dataclass
class Deployment:
    run_dir: Path
    processes: Processes
    first_run_status: int
    seconds_to_first_round: float
    rogue_status: int
    restart_status: int
    stopped_statuses: dict[str, int]
    left_behind: list[str]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    tmp = tmp_path_factory.mktemp("deployment")
    certs, stranger = tmp / "certs", tmp / "stranger"
    make_certs(certs, list(HOSPITALS), [])
    make_certs(stranger, ["rogue"], [])  # a key pair the server never sees
    folders = [write_synthetic_hospital(tmp / "hospitals", i, seed=0) for i in range(len(HOSPITALS))]
    (tmp / "rogue").mkdir()
    run_dir = tmp / "run"
    port = free_port()
    server = f"127.0.0.1:{port}"
    server_args = ["server", "--out", str(run_dir), "--host", "127.0.0.1", "--port", str(port), "--certs", str(certs)]
    processes = Processes(tmp)
    try:
        # 1. three hospitals, 2 rounds; the clients start with the server and wait to be registered
        started = time.monotonic()
        processes.start(
            "server-1", *server_args, "--rounds", "2", "--run-config", *RUN_CONFIG, "server.min-train-nodes=3"
        )
        for name, folder in zip(HOSPITALS, folders, strict=True):
            own_privacy = ["--privacy", "target-epsilon=3.0"] if name == "h0" else []
            processes.start(
                name, "client", "--hospital", str(folder), "--name", name, "--server", server, "--certs", str(certs),
                *own_privacy,
            )  # fmt: skip
        processes.start(
            "rogue", "client", "--hospital", str(tmp / "rogue"), "--name", "rogue", "--server", server,
            "--ca", str(certs / CA_CERT), "--key", str(stranger / "hospitals" / "rogue.key"),
            "--activation-timeout", "0",
        )  # fmt: skip
        first_round = processes.wait_for_output("server-1", "fedmeta: round 1/2", 240)
        first_run_status = processes.wait("server-1", 120)
        rogue_status = processes.wait("rogue", 60)

        # 2. restart for 4 rounds; the hospitals still running rejoin; h2 dies after round 3
        processes.start(
            "server-2", *server_args, "--rounds", "4", "--min-hospitals", "3", "--run-config", *RUN_CONFIG,
            "server.min-train-nodes=2", f"server.round-timeout-s={ROUND_TIMEOUT_S}",
        )  # fmt: skip
        processes.wait_for_output("server-2", "fedmeta: round 3/4", 240)
        processes.kill("h2")
        restart_status = processes.wait("server-2", 2 * ROUND_TIMEOUT_S + 60)

        # 3. the others stop as on Ctrl-C / SIGTERM
        for name in ("h0", "h1"):
            processes.started[name].send_signal(signal.SIGTERM)
        stopped = {name: processes.wait(name, 60) for name in ("h0", "h1")}
        left_behind = [program(p) for p in wait_until_gone(processes.alive(), 20)]
        return Deployment(
            run_dir=run_dir,
            processes=processes,
            first_run_status=first_run_status,
            seconds_to_first_round=first_round - started,
            rogue_status=rogue_status,
            restart_status=restart_status,
            stopped_statuses=stopped,
            left_behind=left_behind,
        )
    finally:
        processes.kill()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.deployment
def test_three_hospitals_train_two_rounds_with_tls_and_node_authentication(deployment: Deployment) -> None:
    out = deployment.processes.output("server-1")
    assert deployment.first_run_status == 0, out[-3000:]
    assert "TLS, hospital authentication" in out
    assert "fedmeta: round 1/2, 3/3 hospitals" in out
    assert "fedmeta: round 2/2, 3/3 hospitals" in out
    first_two = metrics(deployment.run_dir)[:2]
    assert [r["round"] for r in first_two] == [1, 2]
    assert [r["participants"] for r in first_two] == [3, 3]
    for name in HOSPITALS:
        assert f"hospital {name} connected to 127.0.0.1:" in deployment.processes.output(name)
    print(f"\nfedmeta server start -> round 1 complete: {deployment.seconds_to_first_round:.1f}s")


@pytest.mark.slow
@pytest.mark.deployment
def test_a_hospital_with_an_unregistered_key_is_refused(deployment: Deployment) -> None:
    err = (deployment.processes.folder / "rogue.err").read_text().strip()
    assert deployment.rogue_status == 2, deployment.processes.output("rogue")[-3000:]
    assert err.startswith("fedmeta client: 127.0.0.1:") and "refused hospital rogue's key" in err, err
    assert len(err.splitlines()) == 1, err


@pytest.mark.slow
@pytest.mark.deployment
def test_restarted_server_resumes_and_finishes_without_a_killed_hospital(deployment: Deployment) -> None:
    out = deployment.processes.output("server-2")
    assert deployment.restart_status == 0, out[-3000:]
    assert "hospital h0 was registered before" in out
    assert "fedmeta: round 1/4" not in out and "fedmeta: round 3/4, 3/3 hospitals" in out
    rounds = metrics(deployment.run_dir)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert rounds[2]["participants"] == 3
    assert rounds[3]["participants"] == 2 and len(rounds[3]["rejected"]) == 1, rounds[3]
    assert "train" in rounds[3], "round 4 must still update the meta-parameters"


@pytest.mark.slow
@pytest.mark.deployment
def test_train_replies_hold_only_meta_parameter_gradients_and_fixed_metrics(deployment: Deployment) -> None:
    model = load_file(deployment.run_dir / "meta-model.safetensors")
    expected = {name: {"shape": list(array.shape), "dtype": "float32"} for name, array in model.items()}
    replies = [json.loads(line) for line in (deployment.run_dir / "replies.jsonl").read_text().splitlines()]
    received = [r for r in replies if r["type"] == "train" and r["error"] is None]
    assert len(received) == 3 + 3 + 3 + 2
    for reply in received:
        assert reply["arrays"] == {GRADIENT_KEY: expected}
        assert set(reply["metrics"]) == {METRICS_KEY}
        assert set(reply["metrics"][METRICS_KEY]) <= TRAIN_METRICS
        assert reply["configs"] == {}


@pytest.mark.slow
@pytest.mark.deployment
def test_stopping_leaves_no_process_behind(deployment: Deployment) -> None:
    assert deployment.stopped_statuses == {"h0": 130, "h1": 130}
    assert deployment.left_behind == []


def test_certs_make_a_ca_a_server_certificate_and_hospital_keys_and_never_overwrite(tmp_path: Path) -> None:
    lines = make_certs(tmp_path, ["a", "b"], ["fedmeta.example.org", "10.0.0.5"])
    assert len(lines) == 3
    ca = x509.load_pem_x509_certificate((tmp_path / CA_CERT).read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / SERVER_CERT).read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fedmeta.example.org", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "127.0.0.1"]
    for private in (tmp_path / SERVER_KEY, tmp_path / "hospitals" / "a.key", tmp_path / "hospitals" / "b.key"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_ssh_private_key((tmp_path / "hospitals" / "a.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    public = load_ssh_public_key((tmp_path / "hospitals" / "a.key.pub").read_bytes())
    assert public.public_numbers() == key.public_key().public_numbers()
    assert not (tmp_path / "ca.key").exists()

    before = (tmp_path / "hospitals" / "a.key").read_bytes()
    assert make_certs(tmp_path, ["a", "c"], [])[1:] == [
        f"kept {tmp_path / 'hospitals' / 'a.key'}",
        f"wrote {tmp_path / 'hospitals' / 'c.key'} and c.key.pub",
    ]
    assert (tmp_path / "hospitals" / "a.key").read_bytes() == before
    with pytest.raises(UserError, match="use a new --out"):
        make_certs(tmp_path, ["d"], ["other.example.org"])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["server", "--out", "{tmp}/run"], "give --certs DIR"),
        (["server", "--certs", "{tmp}/nowhere"], "{tmp}/nowhere/ca.crt is missing"),
        (["server", "--certs", "{tmp}/certs", "--port", "{busy}"], "port {busy} on 127.0.0.1 is in use"),
        (["client", "--hospital", "{tmp}/nowhere", "--name", "a", "--server", "127.0.0.1:1", "--certs", "{tmp}/certs"],
         "hospital folder {tmp}/nowhere does not exist"),
        (["client", "--hospital", "{tmp}", "--name", "zz", "--server", "127.0.0.1:1", "--certs", "{tmp}/certs"],
         "{tmp}/certs/hospitals/zz.key is missing"),
        (["client", "--hospital", "{tmp}", "--name", "a", "--server", "127.0.0.1:1", "--certs", "{tmp}/certs",
          "--port", "{busy}"], "local port {busy} is in use"),
    ],
)  # fmt: skip
def test_command_errors_are_one_line_naming_the_thing_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    make_certs(tmp_path / "certs", ["a"], [])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        values = {"tmp": str(tmp_path), "busy": str(busy.getsockname()[1])}
        status = cli.main([a.format(**values) for a in args])
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1, err
    assert expected.format(**values) in err
