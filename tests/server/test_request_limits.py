"""Bounded cost per request (issue #19, item 2) on a real sidecar: a large photo does not hold up a small one, a
request whose deadline passed while queued is never started and one abandoned mid-way stops before embedding,
per-token rate and in-flight limits (RESOURCE_EXHAUSTED), the pixel limit read from the header before anything is
decoded, and the bound on embedding norms.

The large photo is synthetic: an LFW photo upscaled 4x (1000 x 1000) pasted on a 4000 x 3000 grey canvas (12 Mpx,
the default limit). Slow detections are simulated by holding the detector of a request (an event the test
releases), so the tests show an ordering (answered while the other is held) instead of racing timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image
from sidecar_harness import ACME_TOKEN, ADMIN_TOKEN, ServerThread, make_config, random_embedding

import advface.service.templates as templates_module
from advface.client import AdvFaceRpcError
from advface.config import Config
from advface.errors import DeadlineExceededError, ImageError, ValidationError
from advface.faces.detect import DETECT_MAX_SIDE
from advface.service.validation import MAX_REQUEST_NORM
from server.interceptors import RequestLimiter
from server.status import RpcFailure

StartServer = Callable[[Config], ServerThread]
TOKENS = {
    ADMIN_TOKEN: {"tenants": "*", "role": "admin"},
    ACME_TOKEN: {"tenants": ["acme"], "role": "client"},
}
BIG = (4000, 3000)
#: Longest a held detection waits for the test to release it (a failing test must not hang).
HOLD_SECONDS = 60.0


def _code(call: Callable[[], Any]) -> AdvFaceRpcError:
    with pytest.raises(AdvFaceRpcError) as err:
        call()
    return err.value


@pytest.fixture(scope="module")
def photo(lfw_sample: list[Path]) -> bytes:
    return lfw_sample[0].read_bytes()


@pytest.fixture(scope="module")
def big_photo(lfw_sample: list[Path]) -> bytes:
    """A 4000 x 3000 JPEG (12 Mpx) holding the first LFW photo upscaled 4x."""
    face = Image.open(lfw_sample[0]).convert("RGB").resize((1000, 1000), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", BIG, (118, 124, 131))
    canvas.paste(face, (1700, 900))
    buf = io.BytesIO()
    canvas.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` grey pixels but holds one compressed row: what a decompression bomb's
    header looks like (decoding it would fail late, after allocating the whole image)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))


class DetectorProbe:
    """Counts the detections of a service's worker detectors and can hold them until released.

    ``hold(predicate)``: detections of images for which ``predicate(image)`` is true wait (``held`` is set while one
    waits) until :meth:`release`. ``sizes``: the image sizes dlib's HOG detector was run on.
    """

    def __init__(self, service: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.sizes: list[tuple[int, int]] = []
        self.held = threading.Event()
        self._release = threading.Event()
        self._predicate: Callable[[np.ndarray], bool] = lambda image: False
        self._lock = threading.Lock()
        for chipper in service.chippers:
            detector = chipper.detector
            monkeypatch.setattr(detector, "detect", self._wrap(detector.detect))
            monkeypatch.setattr(detector, "_detector", _RunRecorder(detector._detector, self.sizes))

    def _wrap(self, detect: Callable[[np.ndarray], Any]) -> Callable[[np.ndarray], Any]:
        def probed(image: np.ndarray) -> Any:
            with self._lock:
                self.calls += 1
            if self._predicate(image):
                self.held.set()
                assert self._release.wait(HOLD_SECONDS), "the held detection was never released"
            return detect(image)

        return probed

    def hold(self, predicate: Callable[[np.ndarray], bool]) -> None:
        self._predicate = predicate

    def release(self) -> None:
        self._release.set()

    def __enter__(self) -> DetectorProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()  # a failing test must not leave a detection held (and the server's worker with it)


class _RunRecorder:
    """Stands for dlib's HOG detector, recording the size of each image it is run on."""

    def __init__(self, detector: Any, sizes: list[tuple[int, int]]) -> None:
        self._detector, self._sizes = detector, sizes

    def run(self, image: np.ndarray, *args: Any) -> Any:
        self._sizes.append(image.shape[:2])
        return self._detector.run(image, *args)


@contextlib.contextmanager
def _set_at_exit(event: threading.Event) -> Iterator[None]:
    try:
        yield
    finally:
        event.set()


def _is_big(image: np.ndarray) -> bool:
    return image.shape[0] * image.shape[1] > 4_000_000


def _run_on_server(server: ServerThread, coroutine: Any, timeout: float = HOLD_SECONDS) -> Any:
    """Run a service coroutine on the server's event loop (no gRPC: nothing cancels it) and return its result."""
    return asyncio.run_coroutine_threadsafe(coroutine, server.loop).result(timeout)


# ------------------------------------------------------------------------------------------- large photos


@pytest.mark.slow
def test_a_large_photo_does_not_hold_up_a_small_one(
    tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch, photo: bytes, big_photo: bytes
) -> None:
    """While a 12 Mpx photo is held in detection, an Identify with a small photo is answered (one lock around
    detection made it wait for the large one), and the large one then completes."""
    server = start_server(make_config(tmp_path, server={"workers": 2}))
    probe = DetectorProbe(server.servicer.service, monkeypatch)
    probe.hold(_is_big)
    with server.client(timeout=120) as slow, server.client() as fast, ThreadPoolExecutor(1) as pool, probe:
        fast.enroll("alice", image=photo)
        big = pool.submit(slow.identify, image=big_photo, top_k=1)
        assert probe.held.wait(HOLD_SECONDS), "the large photo never reached detection"
        started = time.monotonic()
        matches = fast.identify(image=photo, top_k=1, timeout=20)  # answered while the large one is still held
        assert time.monotonic() - started < 20
        assert matches[0].subject_id == "alice" and matches[0].match
        assert not big.done()
        probe.release()
        big_matches = big.result(timeout=120)
    assert big_matches[0].subject_id == "alice" and big_matches[0].match  # the large photo, same person
    assert max(max(size) for size in probe.sizes) <= DETECT_MAX_SIDE  # detection ran on a downscaled copy


@pytest.mark.slow
def test_a_large_photo_embeds_like_the_original(
    tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch, photo: bytes, big_photo: bytes
) -> None:
    """Detection on the downscaled copy, chip cut from the full image: the embedding of the 12 Mpx photo is that of
    the original 250 x 250 photo (cosine > 0.99), and dlib's detector never saw more than DETECT_MAX_SIDE pixels."""
    server = start_server(make_config(tmp_path))
    service = server.servicer.service
    probe = DetectorProbe(service, monkeypatch)
    small = service._embed_image_sync(photo)[0]
    large = service._embed_image_sync(big_photo)[0]
    cosine = float(small @ large / np.linalg.norm(small) / np.linalg.norm(large))
    assert cosine > 0.99, cosine
    assert probe.calls == 2
    assert (250, 250) in probe.sizes and max(max(size) for size in probe.sizes) == DETECT_MAX_SIDE


def test_waiting_protect_image_calls_hold_no_worker(
    tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch, photo: bytes
) -> None:
    """ProtectImage runs one at a time: with two workers, one held ProtectImage and two more waiting for their turn,
    an Identify with a photo still gets a worker (waiting ProtectImage calls used to take the other one)."""
    server = start_server(make_config(tmp_path, server={"workers": 2}))
    service = server.servicer.service
    held, release = threading.Event(), threading.Event()
    protections: list[int] = []

    def protect(data: bytes, options: Any, deadline: float | None = None, abandoned: Any = None) -> Any:
        protections.append(1)
        held.set()
        assert release.wait(HOLD_SECONDS)
        raise ValidationError("image: refused by the test")

    monkeypatch.setattr(service.image_protection, "protect", protect)
    with (
        server.client(timeout=120) as slow,
        server.client() as fast,
        ThreadPoolExecutor(3) as pool,
        _set_at_exit(release),
    ):
        calls = [pool.submit(slow.protect_image, photo, steps=1) for _ in range(3)]
        assert held.wait(HOLD_SECONDS)
        time.sleep(0.3)  # the other two reach their turn's lock
        assert fast.identify(image=photo, top_k=1, timeout=20) == []
        assert len(protections) == 1
        release.set()
        for call in calls:
            assert _code(lambda call=call: call.result(timeout=120)).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(protections) == 3


# ------------------------------------------------------------------------------------------- deadlines


def test_a_request_queued_past_its_deadline_is_never_started(
    tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch, photo: bytes
) -> None:
    """One worker, held in detection by request A. B (1 s deadline) waits behind it: the client gets
    DEADLINE_EXCEEDED and, once A is done, B's photo is never decoded nor detected; C, sent after, is."""
    server = start_server(make_config(tmp_path, server={"workers": 1}))
    decoded: list[int] = []
    load_image = templates_module.load_image
    monkeypatch.setattr(templates_module, "load_image", lambda data, **kw: decoded.append(1) or load_image(data, **kw))
    probe = DetectorProbe(server.servicer.service, monkeypatch)
    probe.hold(lambda image: probe.calls == 1)  # the first detection (A's) is held
    with server.client(timeout=120) as a_client, server.client() as client, ThreadPoolExecutor(1) as pool, probe:
        a = pool.submit(a_client.identify, image=photo, top_k=1)
        assert probe.held.wait(HOLD_SECONDS)
        err = _code(lambda: client.identify(image=photo, top_k=1, timeout=1.0))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        probe.release()
        a.result(timeout=120)
        client.identify(image=photo, top_k=1, timeout=60)  # C: queued after B on the one worker
    assert probe.calls == 2 and len(decoded) == 2  # A and C; B never started


def test_the_deadline_is_checked_when_a_queued_photo_reaches_a_worker(
    tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch, photo: bytes
) -> None:
    """The service's own check, without gRPC cancelling anything: B's deadline passes while it waits for the one
    worker, so its photo is refused when it gets there (DeadlineExceededError), never decoded or detected."""
    server = start_server(make_config(tmp_path, server={"workers": 1}))
    service = server.servicer.service
    probe = DetectorProbe(service, monkeypatch)
    probe.hold(lambda image: probe.calls == 1)
    with probe:
        a = asyncio.run_coroutine_threadsafe(service.identify("t", photo, 1), server.loop)
        assert probe.held.wait(HOLD_SECONDS)
        later = time.monotonic() + 0.3
        b = asyncio.run_coroutine_threadsafe(service.identify("t", photo, 1, deadline=later), server.loop)
        time.sleep(0.6)
    a.result(HOLD_SECONDS)
    with pytest.raises(DeadlineExceededError, match="before decoding the image"):
        b.result(HOLD_SECONDS)
    assert probe.calls == 1


def test_a_detection_that_outlives_its_deadline_stops_before_embedding(
    tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch, photo: bytes
) -> None:
    """A request whose deadline passes during detection is abandoned at the next stage: the encoder never runs
    for it (client: DEADLINE_EXCEEDED); the next request is embedded as usual."""
    server = start_server(make_config(tmp_path, server={"workers": 1}))
    service = server.servicer.service
    embedded: list[int] = []
    embed = service.encoder.embed
    monkeypatch.setattr(service.encoder, "embed", lambda chips: embedded.append(1) or embed(chips))
    probe = DetectorProbe(service, monkeypatch)
    probe.hold(lambda image: probe.calls == 1)
    with server.client() as client, probe:
        err = _code(lambda: client.identify(image=photo, top_k=1, timeout=1.0))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        probe.release()
        client.identify(image=photo, top_k=1, timeout=60)  # runs after the abandoned one on the one worker
    assert probe.calls == 2 and len(embedded) == 1  # the abandoned photo was detected, never embedded


def test_a_failed_photo_abandons_the_rest_of_its_batch(
    tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch, photo: bytes
) -> None:
    """EnrollBatch of three photos on one worker: the first has no face, so the two queued behind it are dropped
    without being decoded; nothing is stored. (An Identify sent after them runs after them on the one worker.)"""
    server = start_server(make_config(tmp_path, server={"workers": 1}))
    decoded: list[int] = []
    load_image = templates_module.load_image
    monkeypatch.setattr(templates_module, "load_image", lambda data, **kw: decoded.append(1) or load_image(data, **kw))
    blank = io.BytesIO()
    Image.new("RGB", (250, 250), "grey").save(blank, "PNG")
    items = [("s0", blank.getvalue()), ("s1", photo), ("s2", photo)]
    with server.client() as client:
        err = _code(lambda: client.enroll_batch([{"subject_id": s, "image": p} for s, p in items]))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "no face" in err.details()
        assert client.info()["counts"]["tenant_templates"] == 0
        client.identify(image=photo, top_k=1)
    assert len(decoded) == 2  # the photo without a face and the Identify's


# ------------------------------------------------------------------------------------------- per-token limits


def test_request_rate_per_token_is_resource_exhausted(tmp_path: Path, start_server: StartServer) -> None:
    """rate_per_second 0.2 (a bucket of one request, refilled every 5 s): a token's second quick call is refused
    RESOURCE_EXHAUSTED, another token still gets through, health is not limited."""
    config = make_config(tmp_path, auth={"enabled": True, "tokens": TOKENS, "rate_per_second": 0.2})
    server = start_server(config)
    with server.client(token=ACME_TOKEN) as acme, server.client(token=ADMIN_TOKEN) as admin:
        acme.info("acme")
        err = _code(lambda: acme.info("acme"))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate_per_second" in err.details()
        assert _code(lambda: acme.enroll("x", embedding=random_embedding(0), tenant="acme")).code() == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        admin.info("acme")  # a token of its own budget
        assert acme.health() == "SERVING"
    assert server.servicer.limiter._in_flight == {}  # every admitted call was released


def test_anonymous_callers_share_one_budget(tmp_path: Path, start_server: StartServer) -> None:
    server = start_server(make_config(tmp_path, auth={"rate_per_second": 0.2}))
    with server.client() as one, server.client() as two:
        one.info()
        assert _code(lambda: two.info()).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_requests_in_flight_per_token_are_resource_exhausted(
    tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch, photo: bytes
) -> None:
    """max_in_flight 1: while the token's Identify is held in detection, its next call (even a cheap one) is
    refused RESOURCE_EXHAUSTED; another token's call is not; once the first ends the token may call again."""
    config = make_config(tmp_path, auth={"enabled": True, "tokens": TOKENS, "max_in_flight": 1})
    server = start_server(config)
    probe = DetectorProbe(server.servicer.service, monkeypatch)
    probe.hold(lambda image: True)
    v = random_embedding(3)
    with (
        server.client(token=ACME_TOKEN, timeout=120) as held,
        server.client(token=ACME_TOKEN) as acme,
        server.client(token=ADMIN_TOKEN) as admin,
        ThreadPoolExecutor(1) as pool,
        probe,
    ):
        first = pool.submit(held.identify, image=photo, tenant="acme")
        assert probe.held.wait(HOLD_SECONDS)
        err = _code(lambda: acme.identify(embedding=v, tenant="acme"))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_in_flight" in err.details()
        assert admin.identify(embedding=v, tenant="acme") == []
        probe.release()
        first.result(timeout=120)
        assert acme.identify(embedding=v, tenant="acme") == []


def test_request_limiter_bucket_and_in_flight() -> None:
    now = [0.0]
    limiter = RequestLimiter(rate_per_second=2.0, max_in_flight=3, clock=lambda: now[0])
    limiter.admit("a")
    limiter.admit("a")  # a burst of one second's worth
    with pytest.raises(RpcFailure, match="rate_per_second") as err:
        limiter.admit("a")
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    limiter.admit("b")  # another caller's budget
    now[0] = 0.5  # one request's worth refilled
    limiter.admit("a")
    with pytest.raises(RpcFailure, match="max_in_flight"):
        limiter.admit("a")  # three of "a" in flight (and the refusal used no budget)
    limiter.release("a")
    now[0] = 100.0
    limiter.admit("a")
    assert limiter.in_flight("a") == 3 and limiter.in_flight("b") == 1
    for _ in range(3):
        limiter.release("a")
    assert limiter.in_flight("a") == 0
    unlimited = RequestLimiter(0, 0)
    for _ in range(10_000):
        unlimited.admit("a")
    assert unlimited.in_flight("a") == 10_000


# ------------------------------------------------------------------------------------------- pixels and norms


@pytest.fixture
def counted_decoding(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Calls of the service's image decoder."""
    decoded: list[int] = []
    load_image = templates_module.load_image
    monkeypatch.setattr(templates_module, "load_image", lambda data, **kw: decoded.append(1) or load_image(data, **kw))
    return decoded


def test_pixel_limit_is_checked_from_the_header_before_decoding(
    tmp_path: Path, start_server: StartServer, counted_decoding: list[int], photo: bytes
) -> None:
    """server.max_image_pixels (here 1 Mpx) bounds every image-taking RPC: a photo over it, or a bomb's header,
    is INVALID_ARGUMENT without being decoded (nothing queued for a worker); a photo under it is embedded."""
    config = make_config(tmp_path, server={"max_image_pixels": 1_000_000}, image_protection={"enabled": True})
    server = start_server(config)
    over = io.BytesIO()
    Image.new("RGB", (1200, 1000), "grey").save(over, "JPEG")
    with server.client() as client:
        client.enroll("alice", image=photo)
        assert len(counted_decoding) == 1
        calls: list[Callable[[bytes], Any]] = [
            lambda data: client.enroll("bob", image=data),
            lambda data: client.enroll_batch(
                [{"subject_id": "b1", "embedding": random_embedding(1)}, {"subject_id": "b2", "image": data}]
            ),
            lambda data: client.verify("alice", image=data),
            lambda data: client.identify(image=data),
            lambda data: client.protect_image(data),
        ]
        for data in (over.getvalue(), _png_header(5000, 5000), _png_header(30000, 30000)):
            started = time.perf_counter()
            for call in calls:
                err = _code(functools.partial(call, data))
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
                assert "too large" in err.details() or "not a readable image" in err.details(), err.details()
            assert time.perf_counter() - started < 5
        assert len(counted_decoding) == 1  # none of them was decoded
        assert client.info()["counts"]["tenant_templates"] == 1
        assert not server.servicer.service.image_protection.loaded  # refused before the ensemble was needed


def test_the_default_pixel_limit_refuses_the_testers_6000_px_photo(tmp_path: Path) -> None:
    """The finding of issue #19: 6000 x 6000 (36 Mpx) was under the old fixed 40 Mpx limit; the default is 12 Mpx."""
    from advface.images import image_size

    config = make_config(tmp_path)
    assert config.server.max_image_pixels == 12_000_000
    with pytest.raises(ImageError, match="too large"):
        image_size(_png_header(6000, 6000), max_pixels=config.server.max_image_pixels)
    assert image_size(_png_header(4000, 3000), max_pixels=config.server.max_image_pixels) == (4000, 3000)


def test_huge_norm_embeddings_are_invalid_argument(tmp_path: Path, start_server: StartServer) -> None:
    """An embedding of norm 1e14 (stored and scored -1e13 before) is refused by every RPC that takes embeddings;
    one at the bound is accepted."""
    server = start_server(make_config(tmp_path))
    v = random_embedding(5)
    huge = v * 1e14
    with server.client() as client:
        client.enroll("alice", embedding=v)
        for call in (
            lambda: client.enroll("bob", embedding=huge),
            lambda: client.enroll_batch([{"subject_id": "b", "embedding": huge}]),
            lambda: client.verify("alice", embedding=huge),
            lambda: client.identify(embedding=huge),
            lambda: client.protect([v, huge]),
            lambda: client.identify(embedding=v * (MAX_REQUEST_NORM * 1.01)),
        ):
            err = _code(call)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "norm" in err.details() and "1000" in err.details(), err.details()
        assert client.info()["counts"]["tenant_templates"] == 1
        client.enroll("carol", embedding=v * (MAX_REQUEST_NORM * 0.99))


def test_norm_bound_message() -> None:
    from advface.service.validation import check_embeddings

    v = random_embedding(6)
    with pytest.raises(ValidationError, match=r"probe has a norm of 1e\+14, above the limit of 1000"):
        check_embeddings([v * 1e14], len(v), "probe")
    with pytest.raises(ValidationError, match=r"embedding rows \[1\] have norms above the limit of 1000"):
        check_embeddings([v, v * 1e4], len(v))
    assert check_embeddings([v * 999], len(v)).shape == (1, len(v))
