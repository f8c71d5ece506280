"""Security: TLS, mutual TLS and bearer tokens against real servers, with certificates made here."""

from __future__ import annotations

import contextlib
import datetime
import http.client
import ipaddress
import re
import ssl
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import MODEL_NAME, HeldOutSplit, ServerProcess, infer_request, outputs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rest_client import call as rest_call
from rest_client import infer_body, reply_outputs
from tolerances import PROBABILITY

from stablemlp.protos import grpc_service_pb2 as pb
from stablemlp.protos import grpc_service_pb2_grpc as pb_grpc
from stablemlp.serving import client
from stablemlp.serving.client import cli as predict_cli
from stablemlp.serving.grpc.auth import TokenInterceptor, authorized

StartServer = Callable[..., contextlib.AbstractContextManager[ServerProcess]]
REST_INFER = f"/v2/models/{MODEL_NAME}/infer"
TIMEOUT = 10.0
TOKEN = "s3cret-token-for-tests"


def _issue(
    folder: Path,
    name: str,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None,
    usage: x509.ObjectIdentifier | None = None,
) -> tuple[x509.Name, ec.EllipticCurvePrivateKey]:
    """Write NAME.pem and NAME.key: a CA (no issuer) or a leaf signed by `issuer`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(issuer_key, hashes.SHA256())
    (folder / f"{name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return subject, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca, server (localhost / 127.0.0.1), client; other-ca and its stranger client."""
    folder = tmp_path_factory.mktemp("pki")
    ca = _issue(folder, "ca")
    _issue(folder, "server", ca, ExtendedKeyUsageOID.SERVER_AUTH)
    _issue(folder, "client", ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    other = _issue(folder, "other-ca")
    _issue(folder, "stranger", other, ExtendedKeyUsageOID.CLIENT_AUTH)
    return folder


def _credentials(pki: Path, ca: str = "ca", client_cert: str = "") -> grpc.ChannelCredentials:
    key = (pki / f"{client_cert}.key").read_bytes() if client_cert else None
    chain = (pki / f"{client_cert}.pem").read_bytes() if client_cert else None
    return grpc.ssl_channel_credentials((pki / f"{ca}.pem").read_bytes(), key, chain)


def _infer(
    address: str,
    rows: np.ndarray,
    credentials: grpc.ChannelCredentials | None,
    metadata: tuple[tuple[str, str], ...] | None = None,
) -> pb.ModelInferResponse:
    if credentials is None:
        channel = grpc.insecure_channel(address)
    else:
        channel = grpc.secure_channel(address, credentials)
    with channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return stub.ModelInfer(infer_request(rows), timeout=TIMEOUT, metadata=metadata)


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code()


def test_tls_serves_only_clients_that_trust_its_certificate(
    model_repository: Path, start_server: StartServer, pki: Path, test_split: HeldOutSplit
) -> None:
    rows = test_split.features[:5]
    tls = ("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"))
    with start_server(model_repository, *tls, credentials=_credentials(pki)) as srv:
        reply = _infer(srv.address, rows, _credentials(pki))
        np.testing.assert_array_equal(outputs(reply)["label"], test_split.label[:5])
        assert _code(lambda: _infer(srv.address, rows, None)) == grpc.StatusCode.UNAVAILABLE
        untrusting = _credentials(pki, ca="other-ca")
        assert _code(lambda: _infer(srv.address, rows, untrusting)) == grpc.StatusCode.UNAVAILABLE
        security = client.Security(ca=pki / "ca.pem")
        results = client.predict(srv.address, rows, MODEL_NAME, security=security)
        assert [label for _, label in results] == test_split.label[:5, 0].tolist()
        # The REST port serves HTTPS with the same certificate, to clients that trust it.
        assert srv.rest_url.startswith("https://")
        trusting = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        reply = rest_call(srv.rest_url, "POST", REST_INFER, infer_body(rows), context=trusting)
        np.testing.assert_array_equal(reply_outputs(reply)["label"], test_split.label[:5])
        other = ssl.create_default_context(cafile=str(pki / "other-ca.pem"))
        with pytest.raises(ssl.SSLError):
            rest_call(srv.rest_url, "GET", "/v2/health/live", context=other)
        with pytest.raises((OSError, http.client.HTTPException)):  # plaintext HTTP: no answer
            rest_call(srv.rest_url.replace("https", "http"), "GET", "/v2/health/live")
    assert re.search(r"ready: listening on \S+ \(TLS\)", srv.log())


def test_mutual_tls_and_a_token_file_with_closed_health(
    model_repository: Path,
    start_server: StartServer,
    pki: Path,
    test_split: HeldOutSplit,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = test_split.features[:3]
    (tmp_path / "token").write_text(TOKEN + "\n")
    args = ("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
            "--tls-client-ca", str(pki / "ca.pem"), "--auth-token-file", str(tmp_path / "token"),
            "--auth-exempt-health", "false")  # fmt: skip
    good = _credentials(pki, client_cert="client")
    token = (("authorization", f"Bearer {TOKEN}"),)
    with start_server(model_repository, *args, credentials=good, metadata=token) as srv:
        reply = _infer(srv.address, rows, good, token)
        np.testing.assert_allclose(
            outputs(reply)["probability"], test_split.probability[:3], rtol=0, atol=PROBABILITY
        )
        anonymous = _credentials(pki)  # trusts the server, shows no certificate
        stranger = _credentials(pki, client_cert="stranger")  # a certificate from another CA
        for credentials in (anonymous, stranger):
            code = _code(lambda c=credentials: _infer(srv.address, rows, c, token))  # type: ignore[misc]
            assert code == grpc.StatusCode.UNAVAILABLE
        assert _code(lambda: _infer(srv.address, rows, good)) == grpc.StatusCode.UNAUTHENTICATED
        with grpc.secure_channel(srv.address, good) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="")
            assert _code(lambda: health.Check(check, timeout=TIMEOUT)) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
            assert health.Check(check, timeout=TIMEOUT, metadata=token).status == 1
        security = client.Security(pki / "ca.pem", pki / "client.pem", pki / "client.key", TOKEN)
        assert client.predict(srv.address, rows, MODEL_NAME, security=security)
        argv = ["--server", srv.address, "--features", "1,2", "--model", MODEL_NAME]
        argv += ["--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem")]
        argv += ["--tls-key", str(pki / "client.key"), "--token-file", str(tmp_path / "token")]
        assert predict_cli.main(argv) == 1  # reached the model: refused for its 2 features
        assert "expected [N, 30]" in capsys.readouterr().err
        # REST: the same client certificate and token; health closed too.
        mutual = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        mutual.load_cert_chain(pki / "client.pem", pki / "client.key")
        reply = rest_call(srv.rest_url, "POST", REST_INFER, infer_body(rows), token=TOKEN,
                          context=mutual)  # fmt: skip
        np.testing.assert_array_equal(reply_outputs(reply)["label"], test_split.label[:3])
        assert rest_call(srv.rest_url, "GET", "/v2/health/ready", context=mutual).status == 401
        anonymous_tls = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
            rest_call(srv.rest_url, "GET", "/v2/health/live", token=TOKEN, context=anonymous_tls)
    log = srv.log()
    assert re.search(r"ready: listening on \S+ \(mTLS\)", log)
    assert "ModelInfer failed: UNAUTHENTICATED" in log and "Check failed: UNAUTHENTICATED" in log
    assert TOKEN not in log


def test_token_check_accepts_only_the_exact_bearer_token() -> None:
    token = TOKEN.encode()
    ok = [("authorization", f"Bearer {TOKEN}")]
    assert authorized(ok, token)
    assert authorized([("authorization", f"bearer {TOKEN}")], token)  # scheme: any case
    for wrong in (
        [],
        [("authorization", TOKEN)],
        [("authorization", f"Basic {TOKEN}")],
        [("authorization", f"Bearer {TOKEN} ")],
        [("authorization", f"Bearer {TOKEN[:-1]}")],
        [("authorization", f"Bearer {TOKEN}x")],
        [("authorization", "Bearer ")],
        [("authorization", "Bearer \udcff")],
        [*ok, *ok],  # two tokens: ambiguous
        [("x-authorization", f"Bearer {TOKEN}")],
    ):
        assert not authorized(wrong, token), wrong


def test_control_rpcs_need_the_control_token_and_others_the_inference_token() -> None:
    interceptor = TokenInterceptor(b"infer", b"control", exempt_health=True)
    service = "/inference.GRPCInferenceService/"
    assert interceptor.required(service + "RepositoryModelLoad") == (b"control", "control token")
    assert interceptor.required(service + "RepositoryModelUnload")[0] == b"control"
    assert interceptor.required(service + "ModelInfer") == (b"infer", "token")
    assert interceptor.required("/grpc.health.v1.Health/Check") == (None, "")
    only_control = TokenInterceptor(None, b"control", exempt_health=True)
    assert only_control.required(service + "ModelInfer") == (None, "token")


class _Tripwire:
    """Unpickling this creates `path`: proof that something ran a pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def test_model_files_are_hashed_and_nothing_in_them_is_executed(
    model_repository: Path, tmp_path: Path
) -> None:
    import hashlib
    import json
    import pickle
    import shutil

    import onnx
    from conftest import cpu_repository

    from stablemlp.serving.errors import ContractError
    from stablemlp.serving.runtime.session import ModelRuntime, RuntimeOptions

    repository = Path(shutil.copytree(model_repository, tmp_path / "repo"))
    tripwire = tmp_path / "executed"
    version = repository / MODEL_NAME / "1"
    for name in ("model.pt", "extra.pkl"):  # a hostile TorchScript file and a stray pickle
        (version / name).write_bytes(pickle.dumps(_Tripwire(tripwire)))
    options = RuntimeOptions(device="cpu", intra_op_threads=1, inter_op_threads=1)
    served = cpu_repository(repository)
    served.load_all()
    assert served.get(MODEL_NAME).version == 1 and not tripwire.exists()

    # ONNX external data: tensors in a file beside model.onnx that no hash covers. Refused before
    # a session is made (test_graph_files.py has the attack and every place one can hide).
    outside = repository / MODEL_NAME / "2"
    shutil.copytree(version, outside)
    graph = onnx.load(str(outside / "model.onnx"))
    onnx.save_model(
        graph,
        str(outside / "model.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    manifest = json.loads((outside / "manifest.json").read_text())
    data = (outside / "model.onnx").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    manifest["files"]["model.onnx"] = {"sha256": digest, "bytes": len(data)}
    (outside / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ContractError, match="its data is in an external file"):
        ModelRuntime(outside, options)


def test_serving_code_never_unpickles_or_evaluates() -> None:
    banned = re.compile(
        r"^\s*(import|from)\s+(pickle|dill|joblib|torch|marshal)\b|\b(eval|exec)\(|allow_pickle=True",
        re.MULTILINE,
    )
    root = Path(__file__).resolve().parents[1] / "serving"  # the serving subpackage
    paths = sorted(root.rglob("*.py"))  # subpackages (grpc/, rest/, runtime/ ...) too
    assert root / "rest" / "wire.py" in paths
    for path in paths:
        assert not banned.search(path.read_text()), path.relative_to(root)


def test_silent_tls_connections_to_the_rest_port_are_closed(
    model_repository: Path, start_server: StartServer, pki: Path
) -> None:
    """One that never starts its handshake, and one that finishes it and then sends nothing:
    the connection cap counts TLS connections once their handshake is done, so the idle sweep
    must see those too, and a stalled handshake must not wait asyncio's 60 s."""
    import socket
    import time

    tls = ("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"))
    args = (*tls, "--client-timeout-s", "2")
    with start_server(model_repository, *args, credentials=_credentials(pki)) as srv:
        host, port = srv.rest_url.split("//")[1].rsplit(":", 1)
        trusting = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        started = time.monotonic()
        stalled = socket.create_connection((host, int(port)), timeout=15)
        shaken = trusting.wrap_socket(
            socket.create_connection((host, int(port)), timeout=15), server_hostname="localhost"
        )
        try:
            assert stalled.recv(1024) == b""  # closed by the server (bounded by the timeout)
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                assert shaken.recv(1024) == b""
            assert time.monotonic() - started < 10  # 2 s and a sweep, not 60 s or never
        finally:
            stalled.close()
            shaken.close()
