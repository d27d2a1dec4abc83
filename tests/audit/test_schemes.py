"""Any scheme under audit (advface.audit.schemes): the reference BioHashing, schemes by name / MODULE:ATTR, and a
scheme given only as a shell command audited end to end (quick settings, one decoder)."""

from __future__ import annotations

import json
import shlex
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from audit_helpers import run_quick_audit

from advface.audit.config import AuditConfig
from advface.audit.schemes import (
    BIOHASH,
    CENTRE_DEFAULT,
    MLPHASH,
    POLYPROTECT,
    SCHEMES,
    biohash,
    centred,
    command_scheme,
    load_scheme,
    mlphash,
    polyprotect,
    scheme_key,
)
from advface.errors import ConfigError

#: A BioHashing-like scheme as a stand-alone script: numpy only, the key read from the {key} file; counts its calls.
SCRIPT = """
import sys, hashlib
import numpy as np
src, dst, key_file, calls = sys.argv[1:5]
with np.load(src) as npz:
    ids, z = npz["ids"], npz["embeddings"].astype(np.float64)
key = bytes.fromhex(open(key_file).read().strip())
rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
q, _ = np.linalg.qr(rng.standard_normal((z.shape[1], z.shape[1])))
bits = np.where(z @ q >= 0, 1.0, -1.0) / np.sqrt(z.shape[1])
np.savez(dst, ids=ids, embeddings=bits.astype(np.float32))
open(calls, "a").write(f"{len(ids)}\\n")
"""


def _script(tmp_path: Path) -> tuple[str, Path]:
    script = tmp_path / "scheme.py"
    script.write_text(textwrap.dedent(SCRIPT))
    calls = tmp_path / "calls.txt"
    command = (
        f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {{in}} {{out}} {{key}} {shlex.quote(str(calls))}"
    )
    return command, calls


def test_biohash_is_keyed_binary_and_keeps_neighbours() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 64)).astype(np.float32)
    near = z + 0.05 * rng.normal(size=z.shape).astype(np.float32)
    a, b = biohash(z, b"k1"), biohash(z, b"k2")
    assert a.shape == (50, 64) and np.allclose(np.abs(a), 1 / 8)
    assert np.array_equal(a, biohash(z, b"k1")) and not np.array_equal(a, b)
    hamming_near = (np.sign(a) != np.sign(biohash(near, b"k1"))).mean()
    hamming_keys = (np.sign(a) != np.sign(b)).mean()
    assert hamming_near < 0.1 < 0.35 < hamming_keys  # another key: about half the bits differ
    assert biohash(z, b"k1", bits=16).shape == (50, 16)


def test_polyprotect_maps_windows_under_a_key() -> None:
    z = np.random.default_rng(3).normal(size=(6, 128)).astype(np.float32) * 0.1
    p = polyprotect(z, b"k")
    assert p.shape == (6, 42)  # windows of 5, overlap 2: ceil((128 - 2) / 3)
    assert np.array_equal(p, polyprotect(z, b"k")) and not np.array_equal(p, polyprotect(z, b"other"))
    assert polyprotect(z, b"k", overlap=0).shape == (6, 26)
    with pytest.raises(ConfigError):
        polyprotect(z, b"k", overlap=5)


def test_mlphash_is_keyed_binary_nonlinear_and_keeps_neighbours() -> None:
    rng = np.random.default_rng(4)
    z = rng.normal(size=(50, 64)).astype(np.float32)
    near = z + 0.05 * rng.normal(size=z.shape).astype(np.float32)
    a, b = mlphash(z, b"k1"), mlphash(z, b"k2")
    assert a.shape == (50, 64) and np.allclose(np.abs(a), 1 / 8)
    assert np.array_equal(a, mlphash(z, b"k1")) and not np.array_equal(a, b)
    hamming_near = (np.sign(a) != np.sign(mlphash(near, b"k1"))).mean()
    hamming_keys = (np.sign(a) != np.sign(b)).mean()
    assert hamming_near < 0.15 < 0.35 < hamming_keys
    # ReLU layers: unlike BioHashing's projection, -z is not hashed to the complement of z's bits
    assert not np.array_equal(mlphash(-z, b"k1"), -a) and np.array_equal(biohash(-z, b"k1"), -biohash(z, b"k1"))
    assert mlphash(z, b"k1", hidden=(32,), bits=16).shape == (50, 16)
    assert load_scheme("mlphash") is MLPHASH
    with pytest.raises(ConfigError):
        mlphash(z, b"k", bits=0)


def test_schemes_by_name_and_module() -> None:
    assert load_scheme("biohash") is BIOHASH and load_scheme("polyprotect") is POLYPROTECT
    wrapped = load_scheme("advface.audit.schemes:biohash")
    z = np.random.default_rng(1).normal(size=(3, 8)).astype(np.float32)
    assert np.array_equal(wrapped.apply(z, b"k"), biohash(z, b"k"))
    with pytest.raises(ConfigError):
        load_scheme("no-such-scheme")
    with pytest.raises(ConfigError):
        load_scheme("advface.audit.schemes:nothing_here")
    assert scheme_key(1) != scheme_key(2) and len(scheme_key(0)) == 32


def _offset_people(people: int, photos: int, seed: int, dim: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Templates far from zero-mean, like dlib's: a shared offset (the same for every seed) much longer than the
    spread between people (drawn from ``seed``), and a small spread between one person's photos."""
    offset = 3.0 * np.random.default_rng(99).normal(size=dim)
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(people, dim))
    z = offset + np.repeat(centres, photos, axis=0) + 0.3 * rng.normal(size=(people * photos, dim))
    return z.astype(np.float32), np.repeat(np.arange(people), photos)


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_centring_on_a_public_mean_separates_people_the_raw_scheme_merges(name: str) -> None:
    """Off-centre templates share most bits (or values) under every reference scheme; hashed minus the mean of other
    people's templates (public: the defender group), impostors move apart while genuine pairs stay close."""
    z, ids = _offset_people(40, 2, seed=1)
    public, _ = _offset_people(30, 1, seed=2)  # other people: the defender group
    scheme = SCHEMES[name]
    centred_scheme = centred(scheme, public.mean(axis=0))
    assert np.allclose(centred_scheme.apply(z, b"k"), scheme.apply(z - public.mean(axis=0), b"k"), atol=1e-6)
    assert centred_scheme.identity != scheme.identity and centred_scheme.name == scheme.name

    def decidability(p: np.ndarray) -> float:
        """d' of impostor vs genuine distances between templates scaled to unit norm."""
        u = p / np.linalg.norm(p, axis=1, keepdims=True)
        d = np.linalg.norm(u[:, None] - u[None], axis=2)
        same = ids[:, None] == ids[None]
        impostor, genuine = d[~same], d[same & ~np.eye(len(ids), dtype=bool)]
        return float((impostor.mean() - genuine.mean()) / np.sqrt((impostor.var() + genuine.var()) / 2))

    assert decidability(centred_scheme.apply(z, b"k")) > 1.2 * decidability(scheme.apply(z, b"k"))


def test_centring_is_checked() -> None:
    z = np.zeros((3, 8), np.float32)
    with pytest.raises(ConfigError, match="finite vector"):
        centred(BIOHASH, np.full(8, np.nan))
    with pytest.raises(ConfigError, match="finite vector"):
        centred(BIOHASH, np.zeros((2, 8)))
    with pytest.raises(ConfigError, match="centre of 4 values"):
        centred(BIOHASH, np.zeros(4)).apply(z, b"k")
    assert isinstance(CENTRE_DEFAULT, bool)


def test_the_audit_centres_a_reference_scheme_on_the_defender_mean(tmp_path: Path) -> None:
    from advface.audit.stages.protection import scheme_protector

    z, _ = _offset_people(10, 2, seed=3)
    defender, _ = _offset_people(5, 1, seed=4)

    def config(centre: bool | None) -> AuditConfig:
        return AuditConfig(data=tmp_path, out=tmp_path / "o", scheme="biohash", scheme_centre=centre)

    on = scheme_protector(config(True), defender)
    off = scheme_protector(config(False), defender)
    default = scheme_protector(config(None), defender)
    key = scheme_key(0)
    assert np.array_equal(on.protect(z, 0, lambda n: None), biohash(z - defender.mean(axis=0), key))
    assert np.array_equal(off.protect(z, 0, lambda n: None), biohash(z, key))
    assert on.cache_key != off.cache_key  # the adaptive insider trained on one is not reused for the other
    assert on.summary.centre is not None and on.summary.centre.startswith("centred: the mean of 5 raw templates")
    assert off.summary.centre is not None and off.summary.centre.startswith("not centred")
    assert default.cache_key == (on if CENTRE_DEFAULT else off).cache_key
    assert on.protect_probes is not None and np.array_equal(on.protect_probes(z), on.protect(z, 0, lambda n: None))
    with pytest.raises(ConfigError, match="defender"):
        scheme_protector(config(True), defender[:0])


def test_command_scheme_runs_the_command(tmp_path: Path) -> None:
    command, calls = _script(tmp_path)
    scheme = command_scheme(command)
    z = np.random.default_rng(2).normal(size=(7, 16)).astype(np.float32)
    out = scheme.apply(z, b"key")
    assert out.shape == (7, 16) and np.allclose(np.abs(out), 0.25)
    assert np.array_equal(out, scheme.apply(z, b"key")) and not np.array_equal(out, scheme.apply(z, b"other"))
    assert calls.read_text().split() == ["7", "7", "7"]
    with pytest.raises(ConfigError, match="exited"):
        command_scheme("false {in} {out}").apply(z, b"k")
    with pytest.raises(ConfigError, match="needs"):
        command_scheme("cat {in}")


def test_scheme_flags_are_checked(tmp_path: Path) -> None:
    data, out = tmp_path, tmp_path / "o"
    with pytest.raises(ConfigError, match="not with"):
        AuditConfig(data, out, scheme="biohash", protection="advface").check()
    with pytest.raises(ConfigError, match="either"):
        AuditConfig(data, out, scheme="biohash", protect_cmd="x {in} {out}").check()
    with pytest.raises(ConfigError, match="needs"):
        AuditConfig(data, out, protect_cmd="x {in}").check()
    with pytest.raises(ConfigError, match="raw-probes"):
        AuditConfig(data, out, raw_probes=True).check()
    for scheme, command in ((None, "x {in} {out}"), ("advface.audit.schemes:biohash", None), (None, None)):
        with pytest.raises(ConfigError, match="reference schemes"):
            AuditConfig(tmp_path, tmp_path / "o", scheme=scheme, protect_cmd=command, scheme_centre=False).check()
    AuditConfig(tmp_path, tmp_path / "o", scheme="mlphash", scheme_centre=False).check()


@pytest.mark.slow
def test_a_scheme_given_only_as_a_shell_command_is_audited_end_to_end(
    audit_dataset: Path, audit_cache: Path, tmp_path: Path
) -> None:

    command, calls = _script(tmp_path)
    out = tmp_path / "out"
    settings = ("--attackers", "deconv", "--transfer-encoder", "none", "--link-keys", "2", "--no-scenarios")
    assert run_quick_audit(audit_dataset, audit_cache, out, "--protect-cmd", command, *settings, "--no-images") == 0
    report = json.loads((out / "report.json").read_text())
    assert "scenarios" not in report
    assert report["protection"]["method"] == "command" and report["protection"]["source"] == "--protect-cmd"
    # templates, probes, unlinkability databases A and B, re-issued templates: one call each
    assert len(calls.read_text().split()) == 5
    assert report["config"]["protect_cmd"] == command
    # BioHashing keeps verification (probes through the same key) and other keys unlink the databases
    verification = report["verification"]
    assert verification["protected"]["accuracy_mean"] > 0.7
    assert report["utility"]["fnmr_at_fmr_1e-3"]["protected"]["genuine_comparisons"] > 0
    d_sys = report["unlinkability"]["d_sys"]
    assert d_sys["advface"] < d_sys["raw"]
    assert "deconv" in report["attacks"] and report["verdict"][4]["attacker"] == "full disclosure"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["protect_cmd"] == command
    assert len(manifest["key_ids"]["scheme key of seed 0"]) == 16
    assert "scheme" not in " ".join(m["stage"] for m in report["missing"])


@pytest.mark.slow
def test_a_scheme_that_changes_the_dimension_is_audited_by_the_attackers_that_fit(
    audit_dataset: Path, audit_cache: Path, tmp_path: Path
) -> None:
    """PolyProtect's 42 values per template: the decoder trained on raw 128-d templates attacks only the raw ones, the
    adaptive insider (trained on the scheme's output) only the protected ones; every other stage runs."""
    from advface.cli.main import main

    out = tmp_path / "out"
    args = ["audit", "--quick", "--data", str(audit_dataset), "--out", str(out), "--cache-dir", str(audit_cache)]
    args += ["--scheme", "polyprotect", "--attackers", "deconv", "adaptive", "--transfer-encoder", "none"]
    assert main([*args, "--link-keys", "2", "--no-images", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["protection"]["method"] == "polyprotect"
    # centred by default on the defender group's mean (public), and named so by the report and the verdict
    assert report["protection"]["centre"].startswith("centred: the mean of") == CENTRE_DEFAULT
    label = "PolyProtect-style (centred)" if CENTRE_DEFAULT else "PolyProtect-style"
    assert f"Protection under audit: <b>{label}</b>" in (out / "report.html").read_text()
    assert all("AdvFace" not in row["holds"] + row["recovers"] for row in report["verdict"])
    assert set(report["attacks"]["deconv"]["type1_success"]) == {"raw"}
    assert set(report["attacks"]["adaptive"]["type1_success"]) == {"protected", "protected+key"}
    assert not [m for m in report["missing"] if m["stage"] != "data"]
    insider = report["verdict"][2]
    assert insider["attacker"] == "insider" and insider["holds"].startswith(f"{label} templates")
    assert insider["best_attacker"] == "adaptive" or insider["best_attacker"].startswith("known pairs")
    # the scenarios take the scheme's 42 values: the inverse map goes back to 128
    scenarios = report["scenarios"]
    assert scenarios["known_pairs"][0]["k"] == 1 and scenarios["full_disclosure"]["inverse"]["decoder"] == "deconv"
