"""``grym-synth serve``'s start-up announcement: the line on stdout and the ports file scripts read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grym_synth.cli import _announce, _parser
from grym_synth.settings import Settings

ENDPOINTS = {"host": "127.0.0.1", "grpc_port": 50051, "metrics_port": 9464, "tls": False, "triton_embedded": True,
             "triton_grpc_url": "127.0.0.1:40001", "triton_grpc_port": 40001,
             "triton_metrics_url": "http://127.0.0.1:40002/metrics", "triton_http_url": None,
             "triton_restricted": True}


def test_announce_prints_and_writes_the_ports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run" / "ports.json"
    _announce(ENDPOINTS, path)
    assert json.loads(path.read_text()) == ENDPOINTS and not list(path.parent.glob("*.tmp"))
    line = capsys.readouterr().out.strip()
    assert line == ("grym-synth ready on 127.0.0.1:50051 (metrics :9464; triton gRPC 127.0.0.1:40001, triton metrics "
                    f"http://127.0.0.1:40002/metrics; ports in {path})")


def test_an_unwritable_ports_file_does_not_stop_the_server(tmp_path: Path, capsys, caplog) -> None:
    (tmp_path / "file").write_text("")
    _announce({**ENDPOINTS, "triton_metrics_url": None}, tmp_path / "file" / "ports.json")
    assert "triton gRPC 127.0.0.1:40001;" in capsys.readouterr().out
    assert "cannot write the ports file" in caplog.text


def test_ports_file_setting_and_flag(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).ports_path == tmp_path.resolve() / "ports.json"
    args = _parser().parse_args(["serve", "--ports-file", str(tmp_path / "p.json")])
    assert args.ports_file == tmp_path / "p.json"
    assert Settings(data_dir=tmp_path, ports_file=args.ports_file).ports_path == tmp_path / "p.json"
