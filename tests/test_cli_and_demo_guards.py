"""The one-line errors of the CLI and of `make demo`'s guards (no services started here)."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.demo import DemoError, main, single_instance
from pipelines.raycluster import PortInUseError, ensure_port_free
from rsitr.cli import main as cli_main


def test_missing_data_folder_is_one_line_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--data", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err and "nope" in err


def test_busy_port_is_named() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} for the Prefect server.*RSITR_PREFECT_PORT"):
            ensure_port_free(port, "the Prefect server", "RSITR_PREFECT_PORT")


def test_second_demo_is_refused_while_one_runs(tmp_path: Path) -> None:
    lock = tmp_path / "demo.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import fcntl,time;f=open(r'{lock}','a+');fcntl.flock(f,fcntl.LOCK_EX);"
            "print('held',flush=True);time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(DemoError, match="another demo is running"), single_instance(lock):
            pass
    finally:
        holder.kill()
        holder.wait()
    with single_instance(lock):
        pass


def test_cli_user_errors_exit_2_with_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli_main(["search", "rivers", "--index", str(tmp_path / "none")]) == 2
    assert "no index at" in capsys.readouterr().err
    assert cli_main(["ingest", "folder", str(tmp_path / "none"), "--dataset", "x", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["eval", "--checkpoint", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "not a checkpoint" in capsys.readouterr().err


def test_a_negative_restart_count_is_refused_by_the_argument_parser(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main(["train", "--data", str(tmp_path), "--max-failures", "-1"])
    assert exited.value.code == 2
    assert "--max-failures: '-1': expected a count ≥ 0" in capsys.readouterr().err


def test_the_cli_starts_without_torch_or_ray() -> None:
    # `rsitr --help` and one-line user errors must not wait seconds for torch and Ray to import
    probe = (
        "import sys, rsitr.cli; rsitr.cli.build_parser(); print(sorted({'torch', 'ray', 'lancedb'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bad_input_is_refused_before_torch_ray_or_lancedb_load(tmp_path: Path) -> None:
    none = str(tmp_path / "none")
    bad = [
        ["search", "  ", "--index", str(tmp_path)],
        ["search", "rivers", "--index", str(tmp_path), "-k", "0"],
        ["search", "rivers", "--index", str(tmp_path), "--bbox", "1,2,3"],
        ["search", "rivers", "--index", str(tmp_path), "--after", "yesterday"],
        ["search", "rivers", "--index", none],
        ["embed", "--checkpoint", none, "--data", none, "--out", none],
        ["eval", "--checkpoint", none, "--data", none],
        ["train", "--data", none],
        ["index", "build", "--embeddings", none, "--out", none],
        ["index", "update", "--archive", none, "--out", none, "--checkpoint", none],
        ["serve", "--index", none],
    ]
    probe = (
        "import sys, json; from rsitr.cli import main; "
        f"codes = [main(args) for args in {bad!r}]; "
        "print(json.dumps([codes, sorted({'torch', 'ray', 'lancedb'} & set(sys.modules))]))"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    codes, heavy = json.loads(run.stdout.strip().splitlines()[-1])
    assert codes == [2] * len(bad) and heavy == []
    reasons = run.stderr.strip().splitlines()
    assert len(reasons) == len(bad) and "empty query" in reasons[0] and "no index at" in reasons[4]
    assert all(none in reason for reason in reasons[4:]), reasons


def test_a_user_error_is_one_line_and_any_other_error_keeps_its_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import rsitr.cli
    from rsitr.errors import ConfigError

    def bad_setting(args: object) -> None:
        raise ConfigError("model.test_views 3: expected one of (1, 4, 8)")

    monkeypatch.setattr(rsitr.cli, "_demo_data", bad_setting)
    assert cli_main(["demo-data"]) == 2
    assert capsys.readouterr().err == "rsitr demo-data: model.test_views 3: expected one of (1, 4, 8)\n"

    def bug(args: object) -> None:
        raise ValueError("operands could not be broadcast together")  # e.g. numpy's: a bug, not the user's doing

    monkeypatch.setattr(rsitr.cli, "_demo_data", bug)
    with pytest.raises(ValueError, match="broadcast"):
        cli_main(["demo-data"])
