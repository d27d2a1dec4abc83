"""benchmarks/diffusion_defences.py: the protected-photo cache keeps each photo's cost and face SSIM, so a run that
reads photos protected earlier (``--protect-only``) reports the same quality as the run that protected them."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import benchmarks.diffusion_defences as dd
from advface.protect.image import ProtectConfig


class _CountingProtector:
    """Adds 3 to every pixel; counts the photos it protected."""

    def __init__(self) -> None:
        self.calls = 0

    def protect(self, images: list[np.ndarray], config: Any, sources: list[str]) -> list[tuple[np.ndarray, Any]]:
        self.calls += 1
        return [(np.clip(images[0].astype(int) + 3, 0, 255).astype(np.uint8), SimpleNamespace(ssim_face=0.95))]


def test_cached_photos_report_the_recorded_seconds_and_face_ssim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dd, "LOCAL", tmp_path / "cache")
    rng = np.random.default_rng(0)
    people = [("A", ["a1", "a2", "a3", "a4"]), ("B", ["b1", "b2", "b3", "b4"])]
    paths = {}
    for _, ids in people:
        for pid in ids:
            paths[pid] = tmp_path / f"{pid}.png"
            dd.save_png(rng.integers(0, 250, (40, 40, 3), dtype=np.uint8), paths[pid])
    protector = _CountingProtector()
    first, quality = dd.protect_people(protector, ProtectConfig(), people, paths, "tag")  # type: ignore[arg-type]
    assert protector.calls == 6  # photos 1-3 of each person
    assert quality["photos"] == 6 and quality["ssim_face_mean"] == pytest.approx(0.95)
    assert quality["seconds_per_photo_cpu"] is not None

    again, cached = dd.protect_people(protector, ProtectConfig(), people, paths, "tag")  # type: ignore[arg-type]
    assert protector.calls == 6  # nothing protected twice
    assert cached == quality
    assert all(np.array_equal(first[pid], again[pid]) for pid in first)


class _FakeAttacker:
    """Records which threats ran; every photo has a face."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.encoder = SimpleNamespace(chip=SimpleNamespace(size=8))
        self.scales: tuple[float, ...] = (3.0,)
        self.seeds: list[int] = []

    def chips(self, photo: np.ndarray) -> np.ndarray:
        return np.zeros((8, 8, 3), np.uint8)

    def purify(self, chips: list[Any], t_star: float, seed: int) -> list[Any]:
        self.calls.append(f"purify {t_star:g}")
        return [np.zeros((8, 8, 3), np.uint8) for _ in chips]

    def training_free(self, chips: list[Any], seed: int) -> list[Any]:
        self.calls.append("training_free")
        return [np.zeros((2, 8, 8, 3), np.uint8) for _ in chips]

    def training_based(self, chips: list[Any], seed: int) -> Any:
        self.calls.append("training_based")
        self.seeds.append(seed)
        return {scale: np.full((2, 8, 8, 3), scale, np.uint8) for scale in self.sampling_scales()}

    def sampling_scales(self) -> tuple[float, ...]:
        return self.scales


class _FakeJudges:
    system_threshold = 0.5
    others = {"transfer": SimpleNamespace(thresholds={"1e-3": 0.5})}

    def score(self, faces: np.ndarray, photo_ids: list[str]) -> dict[str, Any]:
        half = np.arange(len(faces)) % 2 == 0  # every other face accepted by the system judge, every fourth by both
        return {"n": len(faces), "system": half.astype(float), "transfer": (np.arange(len(faces)) % 4 == 0) * 1.0}

    def summary(self, scores: dict[str, Any]) -> dict[str, Any]:
        n = scores["n"]
        return {"faces": n, "system_match": 0.5, "ism_system": 0.9, "transfer_faces": n, "transfer_match": 0.25,
                "ism_transfer": 0.2}  # fmt: skip


@pytest.mark.parametrize("purified_only", [False, True])
def test_purified_only_skips_the_unpurified_threats_but_keeps_the_no_face_count(purified_only: bool) -> None:
    people = [("A", ["a1", "a2", "a3", "a4"]), ("B", ["b1", "b2", "b3", "b4"])]
    photos = {pid: np.zeros((8, 8, 3), np.uint8) for _, ids in people for pid in ids}
    args = SimpleNamespace(
        purify="0.1",
        classical="",
        threats=dd.THREATS,
        seed=0,
        n=2,
        purified_only=purified_only,
        guidance=3.0,
        people_from=0,
    )
    attacker = _FakeAttacker()
    summary = dd.run_threats(attacker, _FakeJudges(), people, photos, args, purify=True)  # type: ignore[arg-type]
    unpurified = {"training_free", "training_based"}
    assert {"purified_0.1_training_free", "purified_0.1_training_based", "purified"} <= set(summary)
    assert (unpurified <= set(summary)) is not purified_only
    assert summary["no_face_rate"] == 0.0
    # training-based runs once per person and level: both levels, or the purified one alone
    assert attacker.calls.count("training_based") == len(people) * (1 if purified_only else 2)


def test_training_based_is_reported_per_sampling_scale_from_one_fine_tuning() -> None:
    people = [("A", ["a1", "a2", "a3", "a4"]), ("B", ["b1", "b2", "b3", "b4"])]
    photos = {pid: np.zeros((8, 8, 3), np.uint8) for _, ids in people for pid in ids}
    args = SimpleNamespace(purify="0.1", classical="", threats=dd.THREATS, seed=0, n=2, purified_only=False,
                           guidance=3.0, people_from=20)  # fmt: skip
    attacker = _FakeAttacker()
    attacker.scales = (3.0, 5.0, 7.5)

    class Judges(_FakeJudges):
        scored: list[set[int]] = []

        def score(self, faces: np.ndarray, photo_ids: list[str]) -> dict[str, Any]:
            Judges.scored.append(set(faces[:, 0, 0, 0].tolist()))
            return super().score(faces, photo_ids)

    summary = dd.run_threats(attacker, Judges(), people, photos, args, purify=True)  # type: ignore[arg-type]
    for prefix in ("", "purified_0.1_"):
        assert {f"{prefix}training_based", f"{prefix}training_based_cfg5", f"{prefix}training_based_cfg7.5"} <= set(
            summary
        )
        assert summary[f"{prefix}training_based_cfg5"]["faces"] == 2 * len(people)
    assert attacker.calls.count("training_based") == 2 * len(people)  # one fine-tuning per person and level
    assert attacker.seeds == [20000, 21000] * 2  # people 21 and 22 keep the seeds of a run from the start
    assert {3, 5, 7} <= set().union(*Judges.scored) and all(len(s) == 1 for s in Judges.scored if s != {0})
    assert dd.training_based_key(3.0, 3.0) == "training_based"
    assert dd.training_based_key(5.0, 3.0) == "training_based_cfg5"


def test_cache_tags_keep_the_first_runs_caches_and_tell_settings_apart() -> None:
    import dataclasses
    import hashlib

    # the first runs' settings (uniform 8/255, encoder weight 1) name no budget: their caches stay valid
    first = ProtectConfig(guidance=("encoders", "deflection"), budget="uniform", encoder_weight=1.0)
    key = f"encoders+deflection|dlib|abc|{first.steps}|{first.deflection_weight}|{first.seed}"
    assert dd.cache_tag(first, "dlib", "abc") == "encoders+deflection-" + hashlib.sha1(key.encode()).hexdigest()[:10]
    default = ProtectConfig()
    tags = {
        dd.cache_tag(default, "dlib", "abc"),
        dd.cache_tag(default, "dlib,mobilefacenet", "abc"),
        dd.cache_tag(default, "dlib", "abd"),
        dd.cache_tag(dataclasses.replace(default, encoder_weight=1.0), "dlib", "abc"),
        dd.cache_tag(dataclasses.replace(default, budget="uniform"), "dlib", "abc"),
        dd.cache_tag(
            dataclasses.replace(default, antipure=dataclasses.replace(default.antipure, identity_weight=3.0)),
            "dlib",
            "abc",
        ),
        dd.cache_tag(dataclasses.replace(default, steps=default.steps + 1), "dlib", "abc"),
        dd.cache_tag(default, "dlib", "abc", high_band_sigma=0.9),
        dd.cache_tag(default, "dlib", "abc", high_band_sigma=1.8),
    }
    assert len(tags) == 9
    assert all(t.startswith("encoders+deflection+antipure-") for t in tags)


def test_attacker_start_embeddings_only_when_asked() -> None:
    class Encoder:
        chip = SimpleNamespace(size=8)

        def embed(self, chips: np.ndarray) -> np.ndarray:
            return chips.reshape(len(chips), -1)[:, :4].astype(np.float32) + 1.0

    attacker = dd.Attacker.__new__(dd.Attacker)
    attacker.encoder = Encoder()  # type: ignore[assignment]
    chips = [np.full((12, 12, 3), v, np.uint8) for v in (10, 20)]
    attacker.args = SimpleNamespace(attacker_start="random")
    assert attacker.start_embeddings(chips) is None
    attacker.args = SimpleNamespace(attacker_start="embedding")
    start = attacker.start_embeddings(chips)
    assert start is not None and start.shape == (2, 4)
    assert np.allclose(start[:, 0], [11, 21])  # each chip resized to the encoder's size, then embedded


def test_training_based_fine_tunes_with_the_requested_steps_and_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {"learned": 0, "sampled": []}

    def fake_learn(generator: Any, small: np.ndarray, config: Any, *, embeddings: Any) -> tuple[str, np.ndarray]:
        seen["learned"] += 1
        seen["config"], seen["embeddings"] = config, embeddings
        return "tuned", np.zeros(4, np.float32)

    def fake_sample(model: str, condition: np.ndarray, n: int, **kwargs: Any) -> np.ndarray:
        assert model == "tuned"
        seen.update(kwargs)
        seen["sampled"].append((kwargs["guidance"], kwargs["seed"]))
        return np.full((n, 4, 4, 3), kwargs["guidance"], np.uint8)

    class Encoder:
        chip = SimpleNamespace(size=8)
        calls = 0

        def embed(self, chips: np.ndarray) -> np.ndarray:
            Encoder.calls += 1
            return chips.reshape(len(chips), -1)[:, :4].astype(np.float32)

    monkeypatch.setattr(dd, "learn_person", fake_learn)
    monkeypatch.setattr(dd, "sample_person", fake_sample)
    attacker = dd.Attacker.__new__(dd.Attacker)
    attacker.generator = SimpleNamespace(image_size=8)  # type: ignore[assignment]
    attacker.encoder = Encoder()  # type: ignore[assignment]
    attacker.guide_encoder = "the differentiable twin"  # type: ignore[assignment]
    attacker.args = SimpleNamespace(
        personalise_steps=300,
        personalise_lr=4e-4,
        attacker_start="random",
        n=2,
        steps=5,
        guidance=3.0,
        sample_guidance=(),
        personalise_guidance=0.0,
    )
    photos = [np.full((12, 12, 3), 10, np.uint8), None, np.full((12, 12, 3), 30, np.uint8)]
    faces = attacker.training_based(photos, seed=7)
    assert faces is not None and list(faces) == [3.0] and len(faces[3.0]) == 2
    assert (seen["config"].steps, seen["config"].lr, seen["config"].seed) == (300, 4e-4, 7)
    assert seen["guide_scale"] == 0.0 and seen["guide_target"] is None  # the canonical attacker: no guidance
    assert attacker.training_based([None, None], seed=7) is None
    attacker.args.personalise_guidance = 0.05  # both levers: sampling pulled towards the photos' mean embedding
    attacker.training_based(photos, seed=7)
    assert seen["guide_scale"] == 0.05 and seen["encoder"] == "the differentiable twin"
    assert np.allclose(seen["guide_target"], [20, 20, 20, 20])
    attacker.args.attacker_start = "embedding"  # the start's embeddings serve the guidance too: embedded once
    Encoder.calls = 0
    attacker.training_based(photos, seed=7)
    assert Encoder.calls == 1 and np.allclose(seen["guide_target"], [20, 20, 20, 20])
    assert np.allclose(seen["embeddings"][:, 0], [10, 30])
    # more sampling scales: one fine-tuning, sampled at each with the same seed
    attacker.args.sample_guidance = (5.0, 7.0)
    seen["learned"], seen["sampled"] = 0, []
    faces = attacker.training_based(photos, seed=7)
    assert seen["learned"] == 1 and seen["sampled"] == [(3.0, 7), (5.0, 7), (7.0, 7)]
    assert faces is not None and {k: int(v[0, 0, 0, 0]) for k, v in faces.items()} == {3.0: 3, 5.0: 5, 7.0: 7}


def test_band_split_separates_what_the_generator_keeps_from_the_rest() -> None:
    clean = np.full((48, 48, 3), 120, np.uint8)
    yy, xx = np.mgrid[:48, :48]
    smooth = np.repeat((6 * np.sin(2 * np.pi * xx / 24))[..., None], 3, axis=2)  # period 24 px: 8 generator pixels
    checker = np.repeat((6 * (-1.0) ** (xx + yy))[..., None], 3, axis=2)  # period 2 px: beyond its Nyquist
    protected = np.clip(np.rint(120 + smooth + checker), 0, 255).astype(np.uint8)
    bands = dd.band_split(clean, protected, pixel=3.0)
    low = bands["low"].astype(float) - 120
    high = bands["high"].astype(float) - 120
    assert np.abs(low - smooth).mean() < 1.0  # the slow wave passes, the checkerboard does not
    assert np.abs(high - checker).mean() < 1.5
    assert np.abs(low + high - (protected.astype(float) - 120)).max() <= 1.0  # the two add up (uint8 rounding)
    assert np.array_equal(dd.band_split(clean, clean, 2.0)["low"], clean)
    coarse = dd.band_split(clean, protected, pixel=3.0, sigma=2.0)["low"].astype(float) - 120
    assert np.abs(coarse).mean() < 0.5 * np.abs(low).mean()  # a wider Gaussian keeps only coarser structure
    with pytest.raises(ValueError, match="must be > 0"):
        dd.band_split(clean, protected, pixel=0.0)


def test_tally_counts_accepted_faces_per_person_with_an_interval() -> None:
    class Judges:
        system_threshold = 0.5
        others = {"transfer": SimpleNamespace(thresholds={"1e-3": 0.3})}

        def score(self, faces: np.ndarray, photo_ids: list[str]) -> dict[str, np.ndarray]:
            values = faces[:, 0, 0, 0].astype(float) / 10
            return {"system": values, "transfer": np.where(values > 0.8, np.nan, values)}

        def summary(self, scored: dict[str, np.ndarray]) -> dict[str, Any]:
            valid = ~np.isnan(scored["transfer"])
            return {
                "faces": len(scored["system"]),
                "system_match": float((scored["system"] >= 0.5).mean()),
                "transfer_match": float((scored["transfer"][valid] >= 0.3).mean()),
                "ism_system": 0.0,
                "ism_transfer": 0.0,
                "transfer_faces": int(valid.sum()),
            }

    def faces(*values: int) -> np.ndarray:
        return np.array([np.full((2, 2, 3), v, np.uint8) for v in values])

    tally = dd.Tally(Judges())  # type: ignore[arg-type]
    tally.add("training_based", faces(9, 6, 1, 2), "b4", 4)  # person B first: 2 by the system judge
    tally.add("training_based", faces(4, 5, 6, 7), "a4", 4)  # person A: 3
    tally.add("training_based", None, "c4", 4)  # person C: no face, 4 counted as not matched
    cell = tally.summary()["training_based"]
    assert cell["per_person"] == {"faces": [4, 4], "system": [2, 3], "transfer": [1, 4]}
    assert cell["match"] == pytest.approx(5 / 12)
    lo, hi = cell["match_ci95"]
    assert lo < 5 / 12 < hi and 0 < lo and hi < 1
    assert cell["transfer"]["match"] == pytest.approx(5 / 11)  # one face without a transfer score


def test_tally_reports_the_unseen_judge_beside_the_others() -> None:
    class Judges:
        system_threshold = 0.5
        others = {
            "transfer": SimpleNamespace(thresholds={"1e-3": 0.3}),
            "unseen": SimpleNamespace(thresholds={"1e-3": 0.7}),
        }

        def score(self, faces: np.ndarray, photo_ids: list[str]) -> dict[str, np.ndarray]:
            values = faces[:, 0, 0, 0].astype(float) / 10
            return {"system": values, "transfer": values, "unseen": np.where(values < 0.2, np.nan, values)}

        def summary(self, scored: dict[str, np.ndarray]) -> dict[str, Any]:
            valid = ~np.isnan(scored["unseen"])
            return {"faces": len(scored["system"]), "ism_system": 0.1, "ism_transfer": 0.2, "ism_unseen": 0.3,
                    "transfer_faces": len(scored["system"]), "unseen_faces": int(valid.sum())}  # fmt: skip

    tally = dd.Tally(Judges())  # type: ignore[arg-type]
    tally.add("training_free", np.array([np.full((2, 2, 3), v, np.uint8) for v in (9, 7, 4, 1)]), "a4", 4)
    cell = tally.summary()["training_free"]
    assert cell["per_person"] == {"faces": [4], "system": [2], "transfer": [3], "unseen": [2]}
    assert cell["unseen"]["match"] == pytest.approx(2 / 3)  # the face of value 1 has no unseen score
    assert cell["unseen"]["ism"] == 0.3 and cell["transfer"]["ism"] == 0.2
    lo, hi = cell["unseen"]["match_ci95"]
    assert lo < 2 / 3 < hi
    top = dd.summarise(
        {"ablation": {"clean": {"training_free": cell}}, "quality": {}, "settings": {"default_config": "x"}}
    )
    assert top["unseen"]["training_free"]["clean"]["match"] == pytest.approx(2 / 3)


def test_high_band_protector_keeps_the_perturbation_out_of_the_low_band(lfw_dir: Path) -> None:
    """A few real steps of the encoder term, split at 1.8 photo pixels: the plain protector's change has a sizeable
    low band (about 0.43 of its norm), the high-band protector's half that (about 0.2: one pass of the high-pass
    filter leaves some of the Gaussian's band, and clipping and rounding add a little)."""
    from advface.images import load_image
    from advface.protect.image import ImageProtector

    photo = load_image(lfw_dir / "images/Aaron_Peirsol/Aaron_Peirsol_0001.jpg")
    config = ProtectConfig(guidance=("encoders",), steps=6, budget="uniform")
    shares = {}
    for name, protector in (
        ("default", ImageProtector(["dlib-torch"], device="cpu", policy="center")),
        ("high", dd.HighBandProtector(["dlib-torch"], device="cpu", policy="center", high_band_sigma=1.8)),
    ):
        protected = protector.protect([photo], config)[0][0]
        bands = dd.band_split(photo, protected, pixel=3.6, sigma=0.5)
        whole = protected.astype(float) - photo
        assert np.abs(whole).max() > 0
        shares[name] = np.linalg.norm(bands["low"].astype(float) - photo) / np.linalg.norm(whole)
    assert shares["high"] < 0.25 and shares["default"] > 0.4
    with pytest.raises(ValueError, match="high_band_sigma"):
        dd.HighBandProtector(["dlib-torch"], device="cpu", high_band_sigma=0)


@pytest.mark.parametrize("scale", ["nan", "-0.1", "inf"])
def test_personalise_guidance_out_of_range_is_refused_before_anything_loads(
    scale: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["diffusion_defences.py", "--surrogate", "none.pt", "--attacker", "none.pt", "--personalise-guidance", scale]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit):
        dd.main()
    assert "--personalise-guidance must be a finite number >= 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option",
    [*(["--sample-guidance", v] for v in ("5,x", "0.5", "5,5", "3", "nan", "inf")), ["--people-from", "-1"],
     ["--people", "0"]],
)  # fmt: skip
def test_sampling_scales_and_people_out_of_range_are_refused_before_anything_loads(
    option: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["diffusion_defences.py", "--surrogate", "none.pt", "--attacker", "none.pt", *option]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit):
        dd.main()
    assert option[0] in capsys.readouterr().err


def test_tally_reports_impostor_ism_and_rank1_when_the_judges_measure_them() -> None:
    class Judges:
        system_threshold = 0.5
        others = {"transfer": SimpleNamespace(thresholds={"1e-3": 0.3})}

        def score(self, faces: np.ndarray, photo_ids: list[str]) -> dict[str, np.ndarray]:
            values = faces[:, 0, 0, 0].astype(float) / 10
            return {"system": values, "transfer": values}

        def summary(self, scored: dict[str, np.ndarray]) -> dict[str, Any]:
            return {"faces": len(scored["system"]), "ism_system": 0.4, "ism_transfer": 0.2, "transfer_faces": 4,
                    "ism_impostor_system": 0.3, "rank1_system": 0.75, "ism_impostor_transfer": 0.1,
                    "rank1_transfer": 0.5}  # fmt: skip

    tally = dd.Tally(Judges())  # type: ignore[arg-type]
    tally.add("training_based", np.array([np.full((2, 2, 3), 9, np.uint8)] * 2), "a4", 2)
    tally.add("training_based", np.array([np.full((2, 2, 3), 1, np.uint8)] * 2), "b4", 2)
    cell = tally.summary()["training_based"]
    assert (cell["ism_impostor"], cell["rank1"], cell["rank1_chance"]) == (0.3, 0.75, 0.5)
    assert (cell["transfer"]["ism_impostor"], cell["transfer"]["rank1"]) == (0.1, 0.5)


def test_a_stopped_run_resumes_from_the_faces_it_kept(tmp_path: Path) -> None:
    people = [(p, [f"{p}{i}" for i in range(1, 5)]) for p in "ABC"]
    photos = {pid: np.zeros((8, 8, 3), np.uint8) for _, ids in people for pid in ids}
    args = SimpleNamespace(purify="0.1", classical="", threats=dd.THREATS, seed=0, n=2, purified_only=False,
                           guidance=3.0, people_from=0)  # fmt: skip
    store = dd.FaceStore(tmp_path / "faces")
    first = _FakeAttacker()
    partial = dd.run_threats(first, _FakeJudges(), people[:2], photos, args, purify=True, store=store)  # type: ignore[arg-type]
    assert first.calls.count("training_based") == 4  # two people, two levels
    again = _FakeAttacker()
    full = dd.run_threats(again, _FakeJudges(), people, photos, args, purify=True, store=store)  # type: ignore[arg-type]
    # only the third person is attacked; the first two are judged from their kept faces
    assert again.calls == ["training_free", "training_based", "purify 0.1", "training_free", "training_based"]
    fresh = dd.run_threats(_FakeAttacker(), _FakeJudges(), people, photos, args, purify=True)  # type: ignore[arg-type]
    assert full == fresh
    assert partial["training_free"]["faces"] == 2 * 3 * 2 and full["training_free"]["faces"] == 3 * 3 * 2


def test_face_store_keeps_missing_faces_and_tells_runs_apart(tmp_path: Path) -> None:
    store = dd.FaceStore(tmp_path)
    faces = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    assert store.load("", "x4") is None
    store.save("", "x4", {"training_free": None, "training_based": faces})
    kept = store.load("", "x4")
    assert kept is not None and kept["training_free"] is None and np.array_equal(kept["training_based"], faces)
    assert store.load("purified_0.1", "x4") is None and store.load("", "y4") is None
    assert not any("x4" in p.name for p in tmp_path.iterdir())  # no photo id on disk
    settings = {"people": 20, "n": 4, "guidance": 3.0}
    digest = dd.face_store_digest("a" * 16, "clean", settings, 0)
    assert digest == dd.face_store_digest("a" * 16, "clean", {**settings, "people": 40, "people_from": 20}, 0)
    for other in (
        dd.face_store_digest("b" * 16, "clean", settings, 0),
        dd.face_store_digest("a" * 16, "tag", settings, 0),
        dd.face_store_digest("a" * 16, "clean", {**settings, "n": 8}, 0),
        dd.face_store_digest("a" * 16, "clean", settings, 1),
    ):
        assert other != digest


def test_runs_side_by_side_keep_each_others_records(tmp_path: Path) -> None:
    records = tmp_path / "records.json"
    mine = dd.add_record(records, "a", {"seconds": 1.0, "ssim_face": 0.97})
    records.write_text(json.dumps({**mine, "b": {"seconds": 2.0, "ssim_face": None}}))  # another run's record
    merged = dd.add_record(records, "c", {"seconds": 3.0, "ssim_face": 0.98})
    assert set(merged) == {"a", "b", "c"} and dd.read_records(records) == merged
    assert not list(tmp_path.glob("*.part"))
