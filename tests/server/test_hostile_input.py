"""A real sidecar under hostile input: malformed protobuf bytes (fixed INVALID_ARGUMENT, one access-log line, counted,
no traceback), fuzzed requests, forged method names and tenants in both log formats, animated images; and the quiet
start of ``advface serve`` (no faiss loader lines, ``--metrics-port``, the score convention in the serving line)."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from PIL import Image
from sidecar_harness import ADMIN_TOKEN, ServerThread, make_config, random_embedding

from advface.api.v1 import SERVICE_NAME
from advface.api.v1 import advface_pb2 as pb
from advface.client import AdvFaceRpcError
from advface.config import Config
from advface.errors import ConfigError, ImageError
from advface.images import load_image
from advface.store.base import MAX_METADATA_KEY_CHARS, MAX_METADATA_KEYS
from advface.testing.serve import wait_ready
from server.app import score_convention
from server.interceptors import ADVFACE_METHODS, MALFORMED_DETAILS, OTHER, rpc_label
from server.logs import ACCESS_LOGGER_NAME, MAX_FIELD_CHARS, JsonFormatter, TextFormatter

ROOT = Path(__file__).resolve().parents[2]
#: Bytes no request message of the API decodes from: a bad wire type, a truncated length-delimited field, a
#: truncated varint, a field number 0.
MALFORMED = (b"\xff\xff\xff", b"\x0a\x05ab", b"\x08", b"\x00\x01")


class LogCapture:
    """The access log's records, formatted by the sidecar's JSON or text formatter."""

    def __init__(self, formatter: logging.Formatter) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(formatter)

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.lines()]


@pytest.fixture
def access_log() -> Iterator[Callable[[logging.Formatter], LogCapture]]:
    """``access_log(formatter)`` -> a LogCapture of the access log for this test."""
    logger = logging.getLogger(ACCESS_LOGGER_NAME)
    level = logger.level
    captures: list[LogCapture] = []

    def capture(formatter: logging.Formatter) -> LogCapture:
        cap = LogCapture(formatter)
        logger.addHandler(cap.handler)
        logger.setLevel(logging.INFO)
        captures.append(cap)
        return cap

    yield capture
    for cap in captures:
        logger.removeHandler(cap.handler)
    logger.setLevel(level)


StartServer = Callable[[Config], ServerThread]
AccessLog = Callable[[logging.Formatter], LogCapture]
Caplog = pytest.LogCaptureFixture
Capfd = pytest.CaptureFixture[str]


def requests_total(server: ServerThread, method: str, code: str) -> float:
    assert server.sidecar is not None and server.sidecar.metrics is not None
    registry = server.sidecar.metrics.registry
    return registry.get_sample_value("advface_rpc_requests_total", {"method": method, "code": code}) or 0.0


def raw_call(channel: grpc.Channel, path: str, payload: bytes, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    """Send ``payload`` as the request bytes of ``path`` (no client-side serialisation): (code, details)."""
    call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    try:
        call(payload, timeout=30, **kwargs)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def _no_tracebacks(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    err = capfd.readouterr().err
    assert "Traceback" not in err and "DecodeError" not in err, err[-2000:]
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, [(r.name, r.getMessage()) for r in loud]


# ---------------------------------------------------------------------------------------------- malformed requests


def test_malformed_requests_are_invalid_argument_logged_and_counted(
    tmp_path: Path, start_server: StartServer, access_log: AccessLog, caplog: Caplog, capfd: Capfd
) -> None:
    caplog.set_level(logging.DEBUG)
    server = start_server(make_config(tmp_path))
    log = access_log(JsonFormatter())
    sent: dict[str, int] = {}
    with grpc.insecure_channel(server.address) as channel:
        for name in sorted(ADVFACE_METHODS):
            for payload in MALFORMED:
                code, details = raw_call(channel, f"/{SERVICE_NAME}/{name}", payload)
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, payload, code, details)
                assert details == MALFORMED_DETAILS
                sent[name] = sent.get(name, 0) + 1
        # a well-formed request still decodes (the guard only answers what does not)
        code, _ = raw_call(channel, f"/{SERVICE_NAME}/Info", pb.InfoRequest().SerializeToString())
        assert code == grpc.StatusCode.OK
        # health and reflection are guarded too (no auth, no tracebacks)
        code, details = raw_call(channel, "/grpc.health.v1.Health/Check", MALFORMED[0])
        assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_DETAILS)
        reflect = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        with pytest.raises(grpc.RpcError) as err:
            list(reflect(iter([MALFORMED[1]]), timeout=30))
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_DETAILS)

    records = [r for r in log.records() if r["code"] == "INVALID_ARGUMENT"]
    for name, count in sent.items():
        assert requests_total(server, name, "INVALID_ARGUMENT") == count
        lines = [r for r in records if r["rpc"] == name]
        assert len(lines) == count  # one access-log line per request
        assert all(set(r) == {"ts", "level", "logger", "msg", "rpc", "code", "latency_ms"} for r in lines)
    assert requests_total(server, "Info", "OK") == 1
    assert requests_total(server, "grpc.health.v1.Health/Check", "INVALID_ARGUMENT") == 1
    assert {r["rpc"] for r in records} == set(sent) | {
        "grpc.health.v1.Health/Check",
        "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    }
    _no_tracebacks(caplog, capfd)


def test_malformed_requests_with_auth(tmp_path: Path, start_server: StartServer, access_log: AccessLog) -> None:
    tokens = {ADMIN_TOKEN: {"tenants": "*", "role": "admin"}}
    server = start_server(make_config(tmp_path, auth={"enabled": True, "tokens": tokens}))
    log = access_log(JsonFormatter())
    with grpc.insecure_channel(server.address) as channel:
        # without a token the call is refused before anything is decoded
        assert raw_call(channel, f"/{SERVICE_NAME}/Enroll", MALFORMED[0])[0] == grpc.StatusCode.UNAUTHENTICATED
        metadata = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
        code, details = raw_call(channel, f"/{SERVICE_NAME}/Enroll", MALFORMED[0], metadata=metadata)
        assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_DETAILS)
    assert [(r["rpc"], r["code"]) for r in log.records()] == [
        ("Enroll", "UNAUTHENTICATED"),
        ("Enroll", "INVALID_ARGUMENT"),
    ]
    assert requests_total(server, "Enroll", "INVALID_ARGUMENT") == 1


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0 and buf:  # flip a byte
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 1 and buf:  # truncate
            del buf[rng.randrange(len(buf)) :]
        elif op == 2:  # insert random bytes
            at = rng.randrange(len(buf) + 1)
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and len(buf) > 2:  # duplicate a slice
            a = rng.randrange(len(buf) - 1)
            b = rng.randrange(a + 1, len(buf))
            buf[b:b] = buf[a:b]
        else:  # random garbage
            buf = bytearray(rng.randbytes(rng.randint(0, 64)))
    return bytes(buf)


def test_fuzzed_enroll_and_identify(
    tmp_path: Path, start_server: StartServer, access_log: AccessLog, caplog: Caplog, capfd: Capfd
) -> None:
    """150 mutated messages to Enroll and Identify: never UNKNOWN or INTERNAL, never a parser's message in the
    details, every call one access-log line and one count."""
    caplog.set_level(logging.DEBUG)
    server = start_server(make_config(tmp_path))
    log = access_log(JsonFormatter())
    vector = [float(v) for v in random_embedding(1)]
    seeds = {
        "Enroll": pb.EnrollRequest(
            tenant="t", subject_id="s", face=pb.Face(embedding=pb.Embedding(values=vector)), metadata={"k": "v"}
        ).SerializeToString(),
        "Identify": pb.IdentifyRequest(
            tenant="t", probe=pb.Face(embedding=pb.Embedding(values=vector)), top_k=3
        ).SerializeToString(),
    }
    rng = random.Random(19)
    seen: dict[str, dict[grpc.StatusCode, int]] = {name: {} for name in seeds}
    with grpc.insecure_channel(server.address) as channel:
        for i in range(150):
            name = "Enroll" if i % 2 == 0 else "Identify"
            code, details = raw_call(channel, f"/{SERVICE_NAME}/{name}", _mutate(rng, seeds[name]))
            assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (code, details)
            assert "class" not in details and "Error parsing" not in details and "Traceback" not in details
            seen[name][code] = seen[name].get(code, 0) + 1
    records = log.records()
    for name, codes in seen.items():
        assert sum(codes.values()) == 75
        assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 0
        for code, count in codes.items():
            assert requests_total(server, name, code.name) == count
            assert sum(1 for r in records if r["rpc"] == name and r["code"] == code.name) == count
    _no_tracebacks(caplog, capfd)


# ------------------------------------------------------------------------------------- log forging and labels


FORGED = "Enroll code=OK tenant=tenantB items=1 code=UNAUTHENTICATED"


def _logfmt(line: str) -> list[tuple[str, str]]:
    """``key=value`` pairs of a text log line (values unquoted the way a shell would)."""
    return [tuple(token.split("=", 1)) for token in shlex.split(line) if "=" in token]  # type: ignore[misc]


def test_text_log_cannot_be_forged_end_to_end(tmp_path: Path, start_server: StartServer, access_log: AccessLog) -> None:
    server = start_server(make_config(tmp_path))
    log = access_log(TextFormatter())
    tenant = 'acme code=OK items=9 "x\\'
    with server.client() as client, pytest.raises(AdvFaceRpcError) as err:
        client.verify("nobody", random_embedding(3), tenant=tenant)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with grpc.insecure_channel(server.address) as channel:
        code, _ = raw_call(channel, f"/{SERVICE_NAME}/{FORGED}", b"")
        assert code == grpc.StatusCode.UNIMPLEMENTED
        code, _ = raw_call(channel, "/advface.v1.AdvFace/NoSuchMethod", b"")
        assert code == grpc.StatusCode.UNIMPLEMENTED
    lines = log.lines()
    assert len(lines) == 3
    verify, forged, unknown = (dict(_logfmt(line)) for line in lines)
    for line in lines:
        assert [k for k, _ in _logfmt(line)].count("code") == 1
    assert verify == {"rpc": "Verify", "code": "NOT_FOUND", "latency_ms": verify["latency_ms"], "tenant": tenant}
    assert forged["rpc"] == unknown["rpc"] == OTHER and forged["code"] == "UNIMPLEMENTED"
    assert "tenantB" not in "\n".join(lines) and "NoSuchMethod" not in "\n".join(lines)
    assert requests_total(server, OTHER, "UNIMPLEMENTED") == 2


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_formatters_escape_and_bound_values(formatter: logging.Formatter) -> None:
    hostile = "t\r\nINFO advface.server.access rpc rpc=Enroll code=OK\x1b[2J\u2028\u0085\u200e" + "x" * 500
    record = logging.LogRecord(ACCESS_LOGGER_NAME, logging.INFO, __file__, 1, "rpc", None, None)
    record.fields = {"rpc": "Enroll", "code": "NOT_FOUND", "tenant": hostile, "items": 1}
    line = formatter.format(record)
    assert len(line.splitlines()) == 1 and "\r" not in line and "\n" not in line
    assert not any(not ch.isprintable() for ch in line)
    if isinstance(formatter, TextFormatter):
        pairs = _logfmt(line)
        assert [k for k, _ in pairs] == ["rpc", "code", "tenant", "items"]
        value = dict(pairs)["tenant"]
    else:
        out = json.loads(line)
        assert out["code"] == "NOT_FOUND" and out["msg"] == "rpc"
        value = out["tenant"]
    assert len(value) == MAX_FIELD_CHARS and value.endswith("…")
    assert value.startswith("t\\r\\nINFO advface.server.access rpc rpc=Enroll code=OK\\x1b[2J\\u2028\\x85\\u200e")


def test_text_values_quote_only_when_needed() -> None:
    record = logging.LogRecord(ACCESS_LOGGER_NAME, logging.INFO, __file__, 1, "rpc", None, None)
    record.fields = {"rpc": "Enroll", "tenant": "", "x": "a=b", "ok": True, "none": None, "ms": 1.5}
    line = TextFormatter().format(record)
    assert line == 'INFO advface.server.access rpc rpc=Enroll tenant="" x="a=b" ok=true none=null ms=1.5'


def test_json_fields_never_replace_the_envelope() -> None:
    record = logging.LogRecord(ACCESS_LOGGER_NAME, logging.INFO, __file__, 1, "rpc", None, None)
    record.fields = {"msg": "forged", "level": "error", "rpc": "Enroll"}
    out = json.loads(JsonFormatter().format(record))
    assert (out["msg"], out["level"], out["rpc"]) == ("rpc", "info", "Enroll")


def test_rpc_labels() -> None:
    assert rpc_label(f"/{SERVICE_NAME}/Enroll") == rpc_label("Enroll") == "Enroll"
    assert rpc_label("/grpc.health.v1.Health/Check") == "grpc.health.v1.Health/Check"
    for path in (f"/{SERVICE_NAME}/{FORGED}", "/evil.Service/Enroll", "Enroll\r\n", "/advface.v1.AdvFace/", "", "/"):
        assert rpc_label(path) == OTHER
    assert ADVFACE_METHODS >= {"Protect", "Enroll", "Identify", "Info", "ProtectImage"}


# ---------------------------------------------------------------------------------------------------- images


def _gif(frames: list[Image.Image]) -> bytes:
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=len(frames) > 1, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def test_animated_images_refused_everywhere(tmp_path: Path, start_server: StartServer, lfw_dir: Path) -> None:
    person = sorted(p for p in (lfw_dir / "images").iterdir() if p.is_dir())[0]
    photo = Image.open(sorted(person.glob("*.jpg"))[0]).convert("RGB")
    animated = _gif([photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    still = _gif([photo])
    with pytest.raises(ImageError, match=r"animated or multi-frame image \(2 frames\)"):
        load_image(animated)
    assert load_image(still).shape == (photo.height, photo.width, 3)
    # a JPEG with an MPO extension (a camera's preview pictures) is one photo: its primary picture
    mpo = io.BytesIO()
    photo.save(mpo, format="MPO", save_all=True, append_images=[photo.resize((64, 64))])
    assert Image.open(io.BytesIO(mpo.getvalue())).format == "MPO"
    assert load_image(mpo.getvalue()).shape == (photo.height, photo.width, 3)

    server = start_server(make_config(tmp_path))
    with server.client() as client:
        assert client.enroll("still", image=still)  # the photo as one frame is enrolled
        for call in (
            lambda: client.enroll("gif", image=animated),
            lambda: client.identify(image=animated),
            lambda: client.verify("still", image=animated),
            lambda: client.enroll_batch([{"subject_id": "gif2", "image": animated}]),
        ):
            with pytest.raises(AdvFaceRpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "animated" in err.value.details()
        assert client.info()["counts"]["tenant_subjects"] == 1


def test_docs_state_the_metadata_limits_the_code_enforces() -> None:
    text = " ".join((ROOT / "docs" / "serve.md").read_text().split())
    assert f"{MAX_METADATA_KEYS} entries, keys 1-{MAX_METADATA_KEY_CHARS} " in text


# ------------------------------------------------------------------------------------------- advface serve start


def test_faiss_imports_quietly() -> None:
    code = "import logging; logging.basicConfig(level=logging.DEBUG); import advface.store; import server.cli.serve"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "faiss" not in out.stderr.lower(), out.stderr


def test_metrics_port_flag() -> None:
    from advface.cli.main import build_parser
    from server.cli.serve import configure

    parser = build_parser()
    config = configure(parser.parse_args(["serve", "--metrics-port", "0"]))
    assert config.metrics.port == 0
    assert configure(parser.parse_args(["serve", "--metrics-port", "9470"])).metrics.port == 9470
    assert configure(parser.parse_args(["serve"])).metrics.port == config.metrics.__class__().port
    with pytest.raises(ConfigError, match="--metrics-port"):
        configure(parser.parse_args(["serve", "--metrics-port", "70000"]))


def test_score_convention() -> None:
    fields = score_convention("euclidean", -0.571)
    assert "minus the Euclidean distance" in fields["score"] and fields["match"].endswith("distance <= 0.571")
    assert score_convention("cosine", 0.36)["match"] == "score >= 0.36"


@pytest.mark.slow
def test_serve_start_is_quiet_and_takes_metrics_port(tmp_path: Path) -> None:
    """``advface serve``: stderr is JSON lines only (no faiss loader chatter, no traceback for malformed requests),
    the serving line explains scores, ``--metrics-port 0`` overrides a metrics port that is taken."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ADVFACE_") or k.endswith("_DIR")}
        env.update(
            ADVFACE_ENCODER_NAME="dlib-torch",
            ADVFACE_PROTECTION_STEPS="2",
            ADVFACE_METRICS_PORT=str(taken),  # would fail the start without the flag
            OMP_NUM_THREADS="1",
        )
        err_path = tmp_path / "serve.err"
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "advface.cli.main", "serve", "--port", "0", "--metrics-port", "0"]
                + ["--data-dir", str(tmp_path / "data")],
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                text=True,
                cwd=ROOT,
            )
            try:
                address = wait_ready(proc, 120)
                assert address is not None, err_path.read_text()[-3000:]
                with grpc.insecure_channel(address) as channel:
                    for name in ("Enroll", "Identify"):
                        code, details = raw_call(channel, f"/{SERVICE_NAME}/{name}", MALFORMED[0])
                        assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_DETAILS)
                records = [json.loads(line) for line in err_path.read_text().splitlines() if line.strip()]
                serving = next(r for r in records if r["msg"] == "serving")
                assert "Euclidean distance" in serving["score"] and "distance <=" in serving["match"]
                metrics = next(r for r in records if r["msg"] == "metrics serving")
                assert not metrics["address"].endswith(f":{taken}")
                with urllib.request.urlopen(metrics["url"], timeout=10) as response:
                    text = response.read().decode()
                assert 'advface_rpc_requests_total{code="INVALID_ARGUMENT",method="Enroll"} 1.0' in text
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(60) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(30)
    text = err_path.read_text()
    assert "Loading faiss" not in text and "Traceback" not in text
    records = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
    rpcs = [(r["rpc"], r["code"]) for r in records if r["msg"] == "rpc"]
    assert rpcs == [("Enroll", "INVALID_ARGUMENT"), ("Identify", "INVALID_ARGUMENT")]
    assert records[-1]["msg"] == "stopped"
