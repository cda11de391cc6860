"""The real deployment on loopback: ``fedmeta server`` and three ``fedmeta client`` processes, TLS and
SuperNode authentication on, each hospital a folder of synthetic DICOM files.

Every party runs the same installed fedmeta: a copy of this checkout made once for the module (so
edits made to the checkout meanwhile change nothing). One scenario, run once for the module (about four
minutes on two cores), then checked piece by piece:

1. the server starts with two hospitals; a hospital whose key the server never registered is refused;
   a party holding ``ca.crt`` and a hospital's key tries to register a key, submit, list and stop runs on
   the server's (hospital-facing) port, and is refused each time; the operator submits a run of a
   modified app (its train handler would write a marker file and return a file's bytes); the third
   hospital joins, every hospital refuses the modified run before any of its code runs, the operator
   stops it, and the three hospitals train the real run's 2 rounds;
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
import shutil
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
from flwr.cli.build import build_fab_from_disk
from safetensors.numpy import load_file

from server.deploy import flwr_json
from server.round_log import read_round_log
from shared import cli, flwr_cli
from shared.certs import CA_CERT, SERVER_CERT, SERVER_KEY, make_certs, make_hospital_key
from shared.errors import UserError
from shared.flower_processes import (
    CONNECTION,
    flower_env,
    free_port,
    toml_value,
    wait_until_gone,
    write_connection,
)
from shared.installed_app import app_files
from shared.run_folder import META_MODEL, REPLIES
from shared.wire import FLAT_ARRAY, GRADIENT_KEY, HOSPITAL_KEY, METRICS_KEY, NO_DP_TRAIN_METRICS, layout_key
from simulations.data.synthetic import write_synthetic_hospital

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
# Far above a normal round here (about 20 s with three hospitals on two cores, several times that on a busy
# machine): the round after the kill ends when Flower reports the dead hospital unavailable (two missed
# heartbeats), not on this timeout.
ROUND_TIMEOUT_S = 240
TRAIN_HANDLER_RAN = "train-handler-ran"
# Appended to client/app.py of the modified app: what a server that ships its own code would run at a site.
MODIFIED_CLIENT_APP = """

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def leak_a_file(msg: Message, context) -> Message:
    Path({marker!r}).write_text("ran")
    scan = next(p for p in Path(str(context.node_config["data-path"])).rglob("*") if p.is_file())
    return Message(RecordDict({{"leak": ConfigRecord({{"bytes": scan.read_bytes()}})}}), reply_to=msg)
"""


def installed_copy(dest: Path) -> Path:
    """This checkout's files (tracked and untracked, none that git ignores) copied to ``dest``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=PROJECT, capture_output=True
    ).stdout.split(b"\0")
    for name in filter(None, (entry.decode() for entry in listed)):
        if (PROJECT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT / name, dest / name)
    return dest


def modified_copy(installed: Path, dest: Path, marker: Path) -> Path:
    shutil.copytree(installed, dest)
    with open(dest / "client" / "app.py", "a") as app:
        app.write(MODIFIED_CLIENT_APP.format(marker=str(marker)))
    return dest


def test_fedmeta_builds_the_fab_flwr_run_builds_without_walking_what_gitignore_excludes(tmp_path: Path) -> None:
    app = installed_copy(tmp_path / "fedmeta")
    (app / ".venv" / "lib").mkdir(parents=True)
    (app / ".venv" / "lib" / "site.py").write_text("print('a virtual environment')\n")
    (app / "runs" / "demo").mkdir(parents=True)
    (app / "runs" / "demo" / "metrics.jsonl").write_text("{}\n")
    (app / "linked.py").symlink_to(app / "client" / "app.py")
    ours = flwr_cli.build_fab_from_disk(app)
    assert ours == build_fab_from_disk(app)  # Flower's own walk and build: byte for byte
    files = app_files(app)
    assert "client/app.py" in files and not {".venv/lib/site.py", "runs/demo/metrics.jsonl", "linked.py"} & set(files)


class Processes:
    """``fedmeta`` commands started by this test, their output in files, and everything started under them."""

    def __init__(self, folder: Path, installed: Path) -> None:
        self.folder = folder
        self.installed = installed
        self.token = secrets.token_hex(6)
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, label: str, *args: str) -> subprocess.Popen:
        env = {**os.environ, MARKER: f"{self.token}:{label}", "PYTHONUNBUFFERED": "1"}
        with open(self.folder / f"{label}.out", "w") as out, open(self.folder / f"{label}.err", "w") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", *args], stdout=out, stderr=err, cwd=self.installed, env=env
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
    intruder: dict[str, dict]  # flwr command -> its JSON answer, from the hospitals' port
    modified_run: dict  # the operator's `flwr run` of the modified app
    modified_marker: Path
    restart_status: int
    stopped_statuses: dict[str, int]
    left_behind: list[str]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    tmp = tmp_path_factory.mktemp("deployment")
    installed = installed_copy(tmp / "installed" / "fedmeta")
    marker = tmp / TRAIN_HANDLER_RAN
    modified = modified_copy(installed, tmp / "modified" / "fedmeta", marker)
    certs, stranger = tmp / "certs", tmp / "stranger"
    make_certs(certs, [], [])
    for name in HOSPITALS:  # each hospital makes its own key pair and sends only NAME.key.pub
        make_hospital_key(tmp / "keys" / name, name)
        shutil.copy(tmp / "keys" / name / f"{name}.key.pub", certs / "hospitals")
    make_hospital_key(stranger, "rogue")  # a key pair the server never sees
    folders = [write_synthetic_hospital(tmp / "hospitals", i, seed=0) for i in range(len(HOSPITALS))]
    (tmp / "rogue").mkdir()
    run_dir = tmp / "run"
    port = free_port()
    server = f"127.0.0.1:{port}"
    server_args = [
        "server", "--out", str(run_dir), "--host", "127.0.0.1", "--port", str(port),
        "--control-port", str(free_port()), "--certs", str(certs),
    ]  # fmt: skip
    processes = Processes(tmp, installed)

    def start_hospital(name: str, folder: Path) -> None:
        own_policy = ["dp=false", "epsilon-budget=3"] if name == "h0" else ["dp=false"]
        processes.start(
            name, "client", "--hospital", str(folder), "--name", name, "--server", server,
            "--ca", str(certs / CA_CERT), "--key", str(tmp / "keys" / name / f"{name}.key"), "--privacy", *own_policy,
        )  # fmt: skip

    try:
        # 1. the server and two hospitals; round 1 waits for three
        started = time.monotonic()
        processes.start(
            "server-1", *server_args, "--rounds", "2", "--run-config", *RUN_CONFIG, "server.min-train-nodes=3"
        )
        for name, folder in zip(HOSPITALS[:2], folders, strict=False):
            start_hospital(name, folder)
        processes.start(
            "rogue", "client", "--hospital", str(tmp / "rogue"), "--name", "rogue", "--server", server,
            "--ca", str(certs / CA_CERT), "--key", str(stranger / "rogue.key"), "--activation-timeout", "0",
        )  # fmt: skip
        for name in HOSPITALS[:2]:
            processes.wait_for_output(name, f"hospital {name} connected to", 180)

        # an intruder with ca.crt and h1's key, on the hospitals' port
        intruder_home = tmp / "intruder"
        write_connection(intruder_home, CONNECTION, server, certs / CA_CERT)
        intruder_env = flower_env(intruder_home)
        intruder = {
            "supernode register": flwr_json(["supernode", "register", str(stranger / "rogue.key.pub"), CONNECTION],
                                            intruder_env),
            "ls": flwr_json(["ls", CONNECTION], intruder_env),
            "run": flwr_json(["run", str(modified), CONNECTION], intruder_env),
        }  # fmt: skip

        # the operator submits the modified app; the third hospital joins; all refuse it
        run_config = tmp / "modified-run-config.toml"
        modified_settings = {
            **dict(item.split("=", 1) for item in RUN_CONFIG),
            "server.rounds": "1", "server.min-train-nodes": "3", "data.heldout-hospitals": "0",
            "server.out-dir": str(tmp / "modified-run"),
        }  # fmt: skip
        run_config.write_text("".join(f'"{k}" = {toml_value(v) if k == "server.out-dir" else v}\n'
                                      for k, v in modified_settings.items()))  # fmt: skip
        operator_env = flower_env(run_dir / "flwr-home")
        modified_run = flwr_json(["run", str(modified), CONNECTION, "--run-config", str(run_config)], operator_env)
        modified_id = str(modified_run.get("run-id"))
        intruder["stop"] = flwr_json(["stop", modified_id, CONNECTION], intruder_env)
        start_hospital(HOSPITALS[2], folders[2])
        for name in HOSPITALS:
            processes.wait_for_output(name, f"refused run {modified_id}", 240)
        flwr_json(["stop", modified_id, CONNECTION], operator_env)

        first_round = processes.wait_for_output("server-1", "fedmeta: round 1/2", 300)
        first_run_status = processes.wait("server-1", 300)
        rogue_status = processes.wait("rogue", 60)

        # 2. restart for 4 rounds; the hospitals still running rejoin; h2 dies after round 3
        processes.start(
            "server-2", *server_args, "--rounds", "4", "--min-hospitals", "3", "--run-config", *RUN_CONFIG,
            "server.min-train-nodes=2", f"server.round-timeout-s={ROUND_TIMEOUT_S}",
        )  # fmt: skip
        processes.wait_for_output("server-2", "fedmeta: round 3/4", 300)
        processes.kill("h2")
        restart_status = processes.wait("server-2", ROUND_TIMEOUT_S + 120)

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
            intruder=intruder,
            modified_run=modified_run,
            modified_marker=marker,
            restart_status=restart_status,
            stopped_statuses=stopped,
            left_behind=left_behind,
        )
    finally:
        processes.kill()


@pytest.mark.slow
@pytest.mark.deployment
def test_three_hospitals_train_two_rounds_with_tls_and_node_authentication(deployment: Deployment) -> None:
    out = deployment.processes.output("server-1")
    assert deployment.first_run_status == 0, out[-3000:]
    assert "TLS, hospital authentication" in out
    assert "fedmeta: round 1/2, 3/3 hospitals" in out
    assert "fedmeta: round 2/2, 3/3 hospitals" in out
    first_two = read_round_log(deployment.run_dir)[:2]
    assert [r.round for r in first_two] == [1, 2]
    assert [r.participants for r in first_two] == [3, 3]
    for name in HOSPITALS:
        assert f"hospital {name} connected to 127.0.0.1:" in deployment.processes.output(name)
    print(f"\nfedmeta server start -> round 1 complete: {deployment.seconds_to_first_round:.1f}s")


@pytest.mark.slow
@pytest.mark.deployment
def test_the_installed_app_runs_in_the_warm_serverapp_and_any_other_app_in_a_fresh_one(deployment: Deployment) -> None:
    executor_lines = [
        line for line in (deployment.run_dir / "superlink.log").read_text().splitlines() if "ServerApp executor" in line
    ]
    warm = [line for line in executor_lines if "the installed fedmeta, run by the spare ServerApp" in line]
    fresh = [line for line in executor_lines if "a fresh flwr-serverapp" in line]
    # the first run and the restarted server's run: each server's first run of the installed fedmeta; the
    # operator's modified app: a fresh process, as Flower starts one
    assert len(warm) == 2 and len(fresh) == 1, executor_lines


@pytest.mark.slow
@pytest.mark.deployment
def test_a_hospital_with_an_unregistered_key_is_refused(deployment: Deployment) -> None:
    err = (deployment.processes.folder / "rogue.err").read_text().strip()
    assert deployment.rogue_status == 2, deployment.processes.output("rogue")[-3000:]
    assert err.startswith("fedmeta client: 127.0.0.1:") and "refused hospital rogue's key" in err, err
    assert len(err.splitlines()) == 1, err


@pytest.mark.slow
@pytest.mark.deployment
def test_only_the_operator_registers_keys_and_submits_lists_and_stops_runs(deployment: Deployment) -> None:
    assert deployment.modified_run.get("success") is True, deployment.modified_run  # the operator, on loopback
    assert set(deployment.intruder) == {"supernode register", "ls", "run", "stop"}
    for command, answer in deployment.intruder.items():
        assert answer.get("success") is False, f"`flwr {command}` on the hospitals' port: {answer}"
    assert deployment.first_run_status == 0, "the intruder's `flwr stop` must not stop anything"


@pytest.mark.slow
@pytest.mark.deployment
def test_every_hospital_refuses_a_modified_app_before_any_of_its_code_runs(deployment: Deployment) -> None:
    run_id = deployment.modified_run["run-id"]
    for name in HOSPITALS:
        out = deployment.processes.output(name)
        assert f"fedmeta client: refused run {run_id}: its app (FAB sha256" in out, out[-3000:]
    assert not deployment.modified_marker.exists()
    installed_apps = (deployment.processes.folder / "hospitals").rglob("client/app.py")
    assert not [app for app in installed_apps if TRAIN_HANDLER_RAN in app.read_text()], "the modified FAB was installed"


@pytest.mark.slow
@pytest.mark.deployment
def test_restarted_server_resumes_and_finishes_without_a_killed_hospital(deployment: Deployment) -> None:
    out = deployment.processes.output("server-2")
    assert deployment.restart_status == 0, out[-3000:]
    assert "hospital h0 was registered before" in out
    assert "fedmeta: round 1/4" not in out and "fedmeta: round 3/4, 3/3 hospitals" in out
    rounds = read_round_log(deployment.run_dir)
    assert [r.round for r in rounds] == [1, 2, 3, 4]
    assert rounds[2].participants == 3
    assert rounds[3].participants == 2 and len(rounds[3].rejected) == 1, rounds[3]
    assert rounds[3].train is not None, "round 4 must still update the meta-parameters"


@pytest.mark.slow
@pytest.mark.deployment
def test_train_replies_hold_only_meta_parameter_gradients_and_fixed_metrics(deployment: Deployment) -> None:
    model = load_file(deployment.run_dir / META_MODEL)
    # packed: one flat float32 array, and a layout record of the meta-parameters' names (and shapes)
    expected = {FLAT_ARRAY: {"shape": [sum(array.size for array in model.values())], "dtype": "float32"}}
    replies = [json.loads(line) for line in (deployment.run_dir / REPLIES).read_text().splitlines()]
    received = [r for r in replies if r["type"] == "train" and r["error"] is None]
    assert len(received) == 3 + 3 + 3 + 2
    for reply in received:
        assert reply["arrays"] == {GRADIENT_KEY: expected}
        assert set(reply["metrics"]) == {METRICS_KEY}
        assert set(reply["metrics"][METRICS_KEY]) <= NO_DP_TRAIN_METRICS  # the hospitals' policies: dp=false
        # the public name the hospital chose, and the gradient's layout
        assert reply["configs"] == {HOSPITAL_KEY: ["name"], layout_key(GRADIENT_KEY): sorted(model)}
        assert reply["hospital"] in {"h0", "h1", "h2"}


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


def test_a_hospital_makes_its_own_key_pair_and_the_server_folder_holds_no_private_hospital_key(tmp_path: Path) -> None:
    make_certs(tmp_path / "certs", [], ["fedmeta.example.org"])
    assert not list((tmp_path / "certs" / "hospitals").iterdir())
    private = tmp_path / "site" / "st-mary.key"
    assert make_hospital_key(tmp_path / "site", "st-mary") == [
        f"wrote {private} (keep it here) and {private}.pub: send only st-mary.key.pub to the server's operator"
    ]
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_ssh_private_key(private.read_bytes(), password=None)
    public = load_ssh_public_key((tmp_path / "site" / "st-mary.key.pub").read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and public.public_numbers() == key.public_key().public_numbers()
    assert make_hospital_key(tmp_path / "site", "st-mary")[0].startswith("kept ")


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
        (["client", "--hospital", "{tmp}", "--name", "a", "--server", "127.0.0.1:1", "--certs", "{tmp}/certs",
          "--privacy", "target-epsilon=3"], "--privacy: unknown policy key 'target-epsilon'"),
        (["client", "--hospital", "{tmp}", "--name", "a", "--server", "127.0.0.1:1", "--certs", "{tmp}/certs",
          "--policy", "{tmp}/nowhere.toml"], "--policy {tmp}/nowhere.toml does not exist"),
        (["certs", "--out", "{tmp}/keys", "--hospital-key", "a", "--hospitals", "b"], "--hospital-key makes only"),
        (["server", "--certs", "{tmp}/certs", "--port", "8000", "--control-port", "8000"],
         "--control-port 8000: pick a port other than --port"),
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
