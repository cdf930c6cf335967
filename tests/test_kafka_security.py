"""Kafka security settings: validation, the aiokafka arguments, and real TLS handshakes.

No broker is needed: the certificates come from deploy/kafka/make-certs.sh (openssl), and the
handshakes are made against a TLS server in this process holding the compose broker's key.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import ScramAuthenticator
from aiokafka.helpers import create_ssl_context
from pydantic import SecretStr, ValidationError

import bus.transport as transport
from bus.settings import BusSettings

ROOT = Path(__file__).resolve().parent.parent
MAKE_CERTS = ROOT / "deploy" / "kafka" / "make-certs.sh"
PASSWORD = "correct-horse-battery-staple"
SASL: dict[str, Any] = {
    "bootstrap": "kafka:9092",
    "security_protocol": "SASL_SSL",
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_username": "p460000",
    "sasl_password": PASSWORD,
}


# --- certificates made by deploy/kafka/make-certs.sh ----------------------------------------------
def _openssl() -> str:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    return openssl


def _make_certs(out: Path, *extra: str) -> Path:
    _openssl()
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    subprocess.run(
        [bash, str(MAKE_CERTS), "--out", str(out), *extra],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out / "secrets"


def _env_file(path: Path) -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in path.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    )
    return dict(pairs)


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The secrets folder of a fresh make-certs.sh run, client certificates included, plus
    the broker's key and certificate as PEM (for the TLS server of these tests)."""
    folder = _make_certs(tmp_path_factory.mktemp("compose"), "--client-certs")
    keystore_password = _env_file(folder / "broker.env")["KEYSTORE_PASSWORD"]
    subprocess.run(
        [_openssl(), "pkcs12", "-in", str(folder / "broker.p12"), "-nodes",
         "-passin", "env:KEYSTORE_PASSWORD", "-out", str(folder / "broker.pem")],
        check=True,
        capture_output=True,
        env={**os.environ, "KEYSTORE_PASSWORD": keystore_password},
        timeout=30,
    )  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def stranger_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CA certificate of another make-certs.sh run: it signed nothing of ``secrets``."""
    return _make_certs(tmp_path_factory.mktemp("stranger")) / "ca.crt"


# --- validation -----------------------------------------------------------------------------------
def test_default_is_plaintext_and_passes_only_the_protocol() -> None:
    """Nothing configured: PLAINTEXT, which the embedded broker speaks, and no other argument."""
    settings = BusSettings()
    assert settings.security_protocol == "PLAINTEXT"
    assert settings.kafka_security() == {"security_protocol": "PLAINTEXT"}


def test_every_security_setting_is_read_from_the_environment(secrets: Path) -> None:
    """XSETTLE_<NAME> sets each field with its own type: a SecretStr, Paths, a bool."""
    env = {
        "XSETTLE_BOOTSTRAP": "localhost:9094",
        "XSETTLE_SECURITY_PROTOCOL": "SASL_SSL",
        "XSETTLE_SASL_MECHANISM": "SCRAM-SHA-256",
        "XSETTLE_SASL_USERNAME": "p460000",
        "XSETTLE_SASL_PASSWORD": PASSWORD,
        "XSETTLE_SSL_CAFILE": str(secrets / "ca.crt"),
        "XSETTLE_SSL_CERTFILE": str(secrets / "p460000.crt"),
        "XSETTLE_SSL_KEYFILE": str(secrets / "p460000.key"),
        "XSETTLE_SSL_CHECK_HOSTNAME": "false",
    }
    settings = BusSettings.from_env(env)
    assert settings.security_protocol == "SASL_SSL"
    assert settings.sasl_mechanism == "SCRAM-SHA-256"
    assert settings.sasl_username == "p460000"
    assert isinstance(settings.sasl_password, SecretStr)
    assert settings.sasl_password.get_secret_value() == PASSWORD
    assert settings.ssl_cafile == secrets / "ca.crt"
    assert settings.ssl_certfile == secrets / "p460000.crt"
    assert settings.ssl_keyfile == secrets / "p460000.key"
    assert settings.ssl_check_hostname is False


@pytest.mark.parametrize("missing", ["sasl_mechanism", "sasl_username", "sasl_password"])
@pytest.mark.parametrize("protocol", ["SASL_SSL", "SASL_PLAINTEXT"])
def test_sasl_needs_mechanism_username_and_password(missing: str, protocol: str) -> None:
    """A SASL protocol without one of its three settings is refused, naming it."""
    values: dict[str, Any] = {**SASL, "security_protocol": protocol}
    del values[missing]
    with pytest.raises(ValidationError, match=f"needs .*{missing} \\(XSETTLE_{missing.upper()}\\)"):
        BusSettings(**values)


@pytest.mark.parametrize("empty", ["sasl_username", "sasl_password"])
def test_empty_username_or_password_counts_as_missing(empty: str) -> None:
    """An empty variable (XSETTLE_SASL_PASSWORD=) is no login."""
    with pytest.raises(ValidationError, match=f"needs {empty}"):
        BusSettings(**{**SASL, empty: ""})


@pytest.mark.parametrize("given", ["sasl_mechanism", "sasl_username", "sasl_password"])
@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SSL"])
def test_sasl_setting_without_sasl_is_refused(given: str, protocol: str) -> None:
    """A SASL setting the protocol would ignore is a mistake, named, not silently dropped."""
    value: Any = {"sasl_mechanism": "PLAIN", "sasl_username": "p460000"}.get(given, PASSWORD)
    with pytest.raises(
        ValidationError, match=f"{given} .* is set, but security_protocol {protocol}"
    ):
        BusSettings(**{"bootstrap": "kafka:9092", "security_protocol": protocol, given: value})


@pytest.mark.parametrize("given", ["ssl_cafile", "ssl_certfile", "ssl_keyfile"])
@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SASL_PLAINTEXT"])
def test_tls_file_without_tls_is_refused(given: str, protocol: str, secrets: Path) -> None:
    """A TLS file the protocol would ignore is refused, naming the setting."""
    values: dict[str, Any] = {**SASL, "security_protocol": protocol}
    if protocol == "PLAINTEXT":
        values = {"bootstrap": "kafka:9092"}
    values[given] = secrets / "ca.crt"
    with pytest.raises(
        ValidationError, match=f"{given} .* is set, but security_protocol {protocol}"
    ):
        BusSettings(**values)


def test_check_hostname_given_without_tls_is_refused() -> None:
    """ssl_check_hostname set for PLAINTEXT would change nothing: refused; its default is not."""
    with pytest.raises(ValidationError, match=r"ssl_check_hostname .* is set"):
        BusSettings.from_env({"XSETTLE_SSL_CHECK_HOSTNAME": "false"})
    assert BusSettings().ssl_check_hostname is True


def test_client_certificate_and_key_come_together(secrets: Path) -> None:
    """mTLS needs the certificate and its key; either alone is refused, naming the other."""
    base: dict[str, Any] = {"bootstrap": "kafka:9092", "security_protocol": "SSL"}
    with pytest.raises(ValidationError, match=r"ssl_certfile .* needs ssl_keyfile"):
        BusSettings(**base, ssl_certfile=secrets / "p460000.crt")
    with pytest.raises(ValidationError, match=r"ssl_keyfile .* needs ssl_certfile"):
        BusSettings(**base, ssl_keyfile=secrets / "p460000.key")
    both = BusSettings(
        **base, ssl_certfile=secrets / "p460000.crt", ssl_keyfile=secrets / "p460000.key"
    )
    assert both.ssl_certfile == secrets / "p460000.crt"


def test_missing_tls_file_is_refused(tmp_path: Path) -> None:
    """A CA file that is not there fails when the settings are made, not at the first connect."""
    with pytest.raises(ValidationError, match=r"ssl_cafile .*does not exist"):
        BusSettings(**SASL, ssl_cafile=tmp_path / "nowhere.crt")


def test_security_needs_an_external_cluster() -> None:
    """Without bootstrap the embedded broker would start, which has no TLS and no login."""
    values = {k: v for k, v in SASL.items() if k != "bootstrap"}
    with pytest.raises(ValidationError, match="embedded broker speaks PLAINTEXT only"):
        BusSettings(**values)


def test_password_is_never_printed(tmp_path: Path) -> None:
    """Neither repr, JSON nor a validation error (which would echo every input) shows it."""
    settings = BusSettings(**SASL)
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings)
    assert PASSWORD not in settings.model_dump_json()
    for bad in (
        {**SASL, "security_protocol": "SSL"},  # a model-level error: pydantic lists the inputs
        {**SASL, "ssl_cafile": tmp_path / "nowhere.crt"},
        {**SASL, "retention_s": 60},
    ):
        with pytest.raises(ValidationError) as caught:
            BusSettings(**bad)
        assert PASSWORD not in str(caught.value)


# --- the aiokafka arguments -----------------------------------------------------------------------
def test_sasl_plaintext_passes_the_login_under_aiokafkas_names() -> None:
    """aiokafka 0.14 takes SCRAM's user and password as sasl_plain_username/_password."""
    settings = BusSettings(**{**SASL, "security_protocol": "SASL_PLAINTEXT"})
    assert settings.kafka_security() == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "p460000",
        "sasl_plain_password": PASSWORD,
    }


def test_scram_authenticator_logs_in_as_the_configured_user() -> None:
    """aiokafka's SCRAM client, fed these arguments, opens with n=<user> (RFC 5802)."""
    kwargs = BusSettings(**{**SASL, "security_protocol": "SASL_PLAINTEXT"}).kafka_security()
    scram = ScramAuthenticator(
        loop=None,
        sasl_plain_username=kwargs["sasl_plain_username"],
        sasl_plain_password=kwargs["sasl_plain_password"],
        sasl_mechanism=kwargs["sasl_mechanism"],
    )
    assert scram.first_message().startswith("n,,n=p460000,r=")


def test_sasl_ssl_context_checks_the_broker_like_aiokafkas_helper(secrets: Path) -> None:
    """The context verifies certificates and host names and trusts exactly the given CA, as
    aiokafka.helpers.create_ssl_context(cafile=...) would make it."""
    kwargs = BusSettings(**SASL, ssl_cafile=secrets / "ca.crt").kafka_security()
    assert set(kwargs) == {
        "security_protocol",
        "ssl_context",
        "sasl_mechanism",
        "sasl_plain_username",
        "sasl_plain_password",
    }
    ours: ssl.SSLContext = kwargs["ssl_context"]
    theirs = create_ssl_context(cafile=secrets / "ca.crt")
    assert ours.verify_mode == theirs.verify_mode == ssl.CERT_REQUIRED
    assert ours.check_hostname is theirs.check_hostname is True
    assert ours.minimum_version == theirs.minimum_version
    assert ours.get_ca_certs() == theirs.get_ca_certs()
    [ca] = ours.get_ca_certs()
    assert ("commonName", "xsettle compose CA") in [pair for rdn in ca["subject"] for pair in rdn]


def test_unreadable_pem_is_a_clear_error(tmp_path: Path) -> None:
    """A CA file that is not PEM fails in kafka_security, naming the files."""
    bogus = tmp_path / "ca.crt"
    bogus.write_text("not a certificate\n", encoding="utf-8")
    settings = BusSettings(**SASL, ssl_cafile=bogus)
    with pytest.raises(ValueError, match="cannot load the TLS files"):
        settings.kafka_security()


async def test_aiokafka_clients_accept_the_arguments(secrets: Path) -> None:
    """Producer, consumer and admin client take the arguments as they are and keep them."""
    settings = BusSettings(**SASL, ssl_cafile=secrets / "ca.crt")
    producer = AIOKafkaProducer(bootstrap_servers="kafka:9092", **settings.kafka_security())
    consumer = AIOKafkaConsumer(bootstrap_servers="kafka:9092", **settings.kafka_security())
    admin = AIOKafkaAdminClient(bootstrap_servers="kafka:9092", **settings.kafka_security())
    try:
        for client in (producer.client, consumer._client, admin._client):
            assert client._security_protocol == "SASL_SSL"
            assert isinstance(client._ssl_context, ssl.SSLContext)
            assert client._sasl_mechanism == "SCRAM-SHA-512"
            assert client._sasl_plain_username == "p460000"
            assert client._sasl_plain_password == PASSWORD
    finally:
        await producer.stop()
        await consumer.stop()
        await admin.close()


class _Recorder:
    """Stands in for an aiokafka client class and keeps the keyword arguments it got."""

    made: list[dict[str, Any]]

    def __init__(self, **kwargs: Any) -> None:
        type(self).made.append(kwargs)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def subscribe(self, *args: Any, **kwargs: Any) -> None:
        return None


def _recorder() -> type[_Recorder]:
    return type("Recorded", (_Recorder,), {"made": []})


async def test_transport_passes_security_to_every_client(
    monkeypatch: pytest.MonkeyPatch, secrets: Path
) -> None:
    """Producer, Consumer and Admin of bus.transport each hand the settings' security on."""
    producers, consumers, admins = _recorder(), _recorder(), _recorder()
    monkeypatch.setattr(transport, "AIOKafkaProducer", producers)
    monkeypatch.setattr(transport, "AIOKafkaConsumer", consumers)
    monkeypatch.setattr(transport, "AIOKafkaAdminClient", admins)
    settings = BusSettings(**SASL, ssl_cafile=secrets / "ca.crt", idempotence=False)
    producer = transport.Producer(settings, "kafka:9092")
    await producer.start()
    await producer.stop()
    transport.Consumer(settings, "kafka:9092", group="xsettle-460000")
    async with transport.Admin(settings, "kafka:9092"):
        pass
    for made in (producers.made, consumers.made, admins.made):
        [kwargs] = made
        assert kwargs["security_protocol"] == "SASL_SSL"
        assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
        assert kwargs["sasl_plain_username"] == "p460000"
        assert kwargs["sasl_plain_password"] == PASSWORD
        assert isinstance(kwargs["ssl_context"], ssl.SSLContext)
        assert kwargs["bootstrap_servers"] == "kafka:9092"


async def test_bench_raw_clients_get_the_security(
    monkeypatch: pytest.MonkeyPatch, secrets: Path
) -> None:
    """The bench's raw aiokafka floor connects as the bus does."""
    bench = pytest.importorskip("simulators.bench")
    producers, consumers = _recorder(), _recorder()
    monkeypatch.setattr(bench, "AIOKafkaProducer", producers)
    monkeypatch.setattr(bench, "AIOKafkaConsumer", consumers)
    monkeypatch.setattr(consumers, "assign", lambda self, parts: None, raising=False)
    settings = BusSettings(**SASL, ssl_cafile=secrets / "ca.crt")
    echo = bench.RawEcho(settings, "kafka:9092", 10, 10)
    echo._producer()
    echo._consumer(echo.req_topic)
    for made in (producers.made, consumers.made):
        [kwargs] = made
        assert kwargs["security_protocol"] == "SASL_SSL"
        assert kwargs["sasl_plain_username"] == "p460000"
        assert isinstance(kwargs["ssl_context"], ssl.SSLContext)


# --- real TLS handshakes with the compose certificates --------------------------------------------
Connect = Callable[..., Any]


@pytest.fixture
async def tls_server(secrets: Path) -> AsyncIterator[Callable[[bool], Any]]:
    """Starts TLS echo servers with the compose broker's key; ``require_client_cert`` makes
    one that wants a client certificate signed by the compose CA (mTLS). Yields the starter;
    each server answers one line with the common name of the client's certificate."""
    servers: list[asyncio.Server] = []

    async def start(require_client_cert: bool) -> int:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(secrets / "broker.pem")
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(secrets / "ca.crt")

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readline()
                peer = writer.get_extra_info("peercert") or {}
                names = [v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"]
                writer.write(f"hello {names[0] if names else 'anonymous'}\n".encode())
                await writer.drain()
            except (ssl.SSLError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def _talk(port: int, context: ssl.SSLContext, server_hostname: str) -> str:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=server_hostname),
        10,
    )
    try:
        writer.write(b"hi\n")
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), 10)).decode().strip()
    finally:
        writer.close()


def _context(**values: Any) -> ssl.SSLContext:
    context = BusSettings(**{**SASL, **values}).kafka_security()["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    return context


async def test_tls_reaches_the_broker_by_its_names(secrets: Path, tls_server: Any) -> None:
    """The broker certificate holds the names clients dial: kafka (inside compose) and
    localhost (from the host); the context trusts it through the compose CA."""
    port = await tls_server(False)
    context = _context(ssl_cafile=secrets / "ca.crt")
    for name in ("kafka", "localhost"):
        assert await _talk(port, context, name) == "hello anonymous"


async def test_tls_refuses_a_wrong_name_unless_told(secrets: Path, tls_server: Any) -> None:
    """A certificate for other names fails the host check; ssl_check_hostname=False skips only
    that check."""
    port = await tls_server(False)
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        await _talk(port, _context(ssl_cafile=secrets / "ca.crt"), "kafka.elsewhere.example")
    relaxed = _context(ssl_cafile=secrets / "ca.crt", ssl_check_hostname=False)
    assert await _talk(port, relaxed, "kafka.elsewhere.example") == "hello anonymous"


async def test_tls_refuses_a_broker_of_another_ca(
    secrets: Path, stranger_ca: Path, tls_server: Any
) -> None:
    """Trusting another CA, the broker is refused, with or without the host check."""
    port = await tls_server(False)
    for check in (True, False):
        context = _context(ssl_cafile=stranger_ca, ssl_check_hostname=check)
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            await _talk(port, context, "kafka")


async def test_mtls_presents_the_province_certificate(secrets: Path, tls_server: Any) -> None:
    """With ssl_certfile/ssl_keyfile (security_protocol SSL) the broker sees CN=p460000;
    without them a broker that requires a client certificate refuses the connection."""
    port = await tls_server(True)
    mtls = BusSettings(
        bootstrap="kafka:9092",
        security_protocol="SSL",
        ssl_cafile=secrets / "ca.crt",
        ssl_certfile=secrets / "p460000.crt",
        ssl_keyfile=secrets / "p460000.key",
    )
    kwargs = mtls.kafka_security()
    assert set(kwargs) == {"security_protocol", "ssl_context"}
    assert await _talk(port, kwargs["ssl_context"], "kafka") == "hello p460000"
    anonymous = _context(ssl_cafile=secrets / "ca.crt")
    try:  # TLS 1.3 ends the client's handshake before the server checks: refused, or closed
        answer = await _talk(port, anonymous, "kafka")
    except (ssl.SSLError, ConnectionError):
        answer = ""
    assert answer == "", f"answered {answer!r} to a client without a certificate"


# --- make-certs.sh --------------------------------------------------------------------------------
def test_make_certs_gives_each_principal_its_own_password(secrets: Path) -> None:
    """broker.env holds one random password per principal and the keystore's; each
    <principal>.env and admin.properties repeat the right one."""
    broker = _env_file(secrets / "broker.env")
    provinces = [
        line
        for line in (ROOT / "deploy/kafka/provinces.txt").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    ]
    principals = ["admin", "ops", "demo", *(f"p{code}" for code in provinces)]
    assert set(broker) == {"KEYSTORE_PASSWORD"} | {
        f"SCRAM_PASSWORD_{p.upper()}" for p in principals
    }
    assert len(set(broker.values())) == len(broker), "two principals share a password"
    for value in broker.values():
        assert len(value) == 48
        int(value, 16)
    for principal in principals:
        login = _env_file(secrets / f"{principal}.env")
        assert login == {
            "XSETTLE_SASL_USERNAME": principal,
            "XSETTLE_SASL_PASSWORD": broker[f"SCRAM_PASSWORD_{principal.upper()}"],
        }
    admin = (secrets / "admin.properties").read_text(encoding="utf-8")
    assert f'username="admin" password="{broker["SCRAM_PASSWORD_ADMIN"]}";' in admin
    assert "security.protocol=SASL_SSL" in admin
    assert "sasl.mechanism=SCRAM-SHA-512" in admin


def test_make_certs_keystore_opens_with_its_password(secrets: Path) -> None:
    """broker.p12 opens with KEYSTORE_PASSWORD (openssl; and Java's keytool when installed,
    as the broker reads it) and holds the broker key with its certificate chain."""
    password = _env_file(secrets / "broker.env")["KEYSTORE_PASSWORD"]
    env = {**os.environ, "KEYSTORE_PASSWORD": password}
    wrong = subprocess.run(
        [_openssl(), "pkcs12", "-in", str(secrets / "broker.p12"), "-nokeys",
         "-passin", "pass:wrong"],
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    assert wrong.returncode != 0
    keytool = shutil.which("keytool")
    if keytool is not None:
        listing = subprocess.run(
            [keytool, "-list", "-v", "-storetype", "PKCS12",
             "-keystore", str(secrets / "broker.p12"), "-storepass:env", "KEYSTORE_PASSWORD"],
            check=True,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        ).stdout  # fmt: skip
        assert "PrivateKeyEntry" in listing
        assert "Certificate chain length: 2" in listing


def test_make_certs_is_idempotent(tmp_path: Path) -> None:
    """A second run keeps the passwords and the CA; a new province gets a principal."""
    first = _make_certs(tmp_path)
    passwords = _env_file(first / "broker.env")
    ca = (first / "ca.crt").read_bytes()
    provinces = tmp_path / "provinces.txt"
    provinces.write_text("460000\n990000\n", encoding="utf-8")
    bash = shutil.which("bash")
    assert bash is not None
    subprocess.run(
        [bash, str(MAKE_CERTS), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        env={**os.environ, "PROVINCES_FILE": str(provinces)},
        timeout=120,
    )
    again = _env_file(first / "broker.env")
    assert (first / "ca.crt").read_bytes() == ca
    for key in ("KEYSTORE_PASSWORD", "SCRAM_PASSWORD_ADMIN", "SCRAM_PASSWORD_P460000"):
        assert again[key] == passwords[key]
    assert "SCRAM_PASSWORD_P990000" in again
    assert (first / "p990000.env").exists()
    assert ((tmp_path / "ca" / "ca.key").stat().st_mode & 0o077) == 0, "the CA key is private"


def test_make_certs_output_is_never_committed() -> None:
    """git ignores every file make-certs.sh writes into deploy/kafka."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("deploy/kafka/secrets/broker.env", "deploy/kafka/ca/ca.key"):
        ignored = subprocess.run([git, "check-ignore", "-q", path], cwd=ROOT, timeout=30)
        assert ignored.returncode == 0, path
