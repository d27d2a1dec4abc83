"""Any protection scheme under audit: the plug-in interface of ``advface audit --scheme`` / ``--protect-cmd``.

A scheme turns raw templates (N x D float32) and a key (bytes) into protected templates (N x D' float32), row for
row; with ``transforms_probes`` the system protects probes the same way (with the enrolment's key) before comparing.
The audit compares protected templates with the encoder's score (cosine or minus Euclidean distance); a binary
scheme should write its bits as +-1 / sqrt(D'), for which both scores are monotonic in the Hamming distance.

Sources of a scheme:

- ``biohash`` / ``mlphash`` / ``polyprotect``: the reference schemes of this module (BioHashing; MLP-hash, a keyed
  random MLP with ReLU and binarisation; a PolyProtect-style polynomial mapping);
- ``MODULE:ATTR``: a :class:`ProtectionScheme`, or a callable ``(templates, key) -> protected``;
- the name of an entry point of the group :data:`ENTRY_POINT_GROUP` (a package's ``pyproject.toml``:
  ``[project.entry-points."advface.audit_schemes"] NAME = "module:attr"``), loaded as ``MODULE:ATTR``;
- a shell command (:func:`command_scheme`): ``{in}`` / ``{out}`` are embeddings files (:mod:`advface.embeddings_file`),
  ``{key}`` (optional) a file holding the key as hex.

Centring (:attr:`ProtectionScheme.centre`): the reference schemes can hash ``z - mean`` instead of ``z``, with a
*public* mean (the audit's: the raw templates of the defender group, disjoint from the audited and attacker people;
not a secret, so the attacker is assumed to know it). Embeddings such as dlib's are far from zero-mean, so without it
most signs are shared by everyone; :data:`CENTRE_DEFAULT` is the audit's default (benchmarks/RESULTS.md, "Protection
schemes compared").

Keys: the audit derives one key per protection seed (:func:`scheme_key`), so the unlinkability databases A and B and
the re-issued templates are protected under different keys; every template of one database shares its key (the
stolen-token setting, BTPBench's full disclosure of keys to the attacker).
"""

from __future__ import annotations

import hashlib
import importlib
import shlex
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from advface.embeddings_file import EmbeddingsFile, load_embeddings, save_embeddings
from advface.errors import AdvfaceError, ConfigError

#: Entry-point group of third-party schemes.
ENTRY_POINT_GROUP = "advface.audit_schemes"
#: Seconds a ``--protect-cmd`` command may run per call.
COMMAND_TIMEOUT_S = 600.0
#: Whether the audit centres the reference schemes' input on the public defender-group mean when the run does not
#: say (``advface audit --centre`` / ``--no-centre``): on, chosen by measurement (benchmarks/scheme_centring.py,
#: benchmarks/RESULTS.md "Protection schemes compared": centring lowers BioHashing's and MLP-hash's FNMR at FMR 0.1%
#: and leaves PolyProtect-style's within its interval).
CENTRE_DEFAULT = True

SchemeFn = Callable[[np.ndarray, bytes], np.ndarray]


@dataclass(frozen=True)
class ProtectionScheme:
    """A template-protection scheme: ``protect(templates, key)`` row for row, and whether probes go through it."""

    name: str
    protect: SchemeFn
    transforms_probes: bool = True
    #: What identifies the scheme's code or command (the adaptive attacker's cache key).
    identity: str = ""
    #: A public mean (D values) subtracted from every template before ``protect`` (None: templates as they come).
    centre: np.ndarray | None = field(default=None, compare=False, repr=False)

    def apply(self, templates: np.ndarray, key: bytes) -> np.ndarray:
        """``protect`` checked: float32, one finite row per input row (centred first when ``centre`` is set)."""
        z = np.asarray(templates, np.float32)
        if self.centre is not None:
            if z.ndim != 2 or z.shape[1] != self.centre.shape[0]:
                raise ConfigError(
                    f"scheme {self.name}: templates of shape {z.shape} for a centre of {self.centre.shape[0]} values"
                )
            z = z - self.centre
        out = np.asarray(self.protect(z, key), np.float32)
        if out.ndim != 2 or out.shape[0] != z.shape[0]:
            raise ConfigError(f"scheme {self.name}: {z.shape[0]} templates in, output of shape {out.shape}")
        if not np.isfinite(out).all():
            raise ConfigError(f"scheme {self.name}: non-finite values in its output")
        return out


def centred(scheme: ProtectionScheme, mean: np.ndarray) -> ProtectionScheme:
    """``scheme`` applied to ``templates - mean`` (``mean`` public: one finite value per template dimension); its
    identity names the mean, so an attacker cached for the uncentred scheme is not reused."""
    centre = np.asarray(mean, np.float32)
    if centre.ndim != 1 or not len(centre) or not np.isfinite(centre).all():
        raise ConfigError(f"scheme {scheme.name}: the centre must be a finite vector, got shape {centre.shape}")
    digest = hashlib.sha256(centre.tobytes()).hexdigest()[:16]
    return replace(scheme, centre=centre, identity=f"{scheme.identity}|centre={digest}")


def scheme_key(seed: int, length: int = 32) -> bytes:
    """The key the audit gives a scheme for protection seed ``seed`` (public: the audit models a disclosed key)."""
    return hashlib.sha256(f"advface-audit-scheme-key|{seed}".encode()).digest()[:length]


def scheme_key_id(seed: int) -> str:
    """A public fingerprint of :func:`scheme_key` ``(seed)`` for the manifest (16 hex digits)."""
    return hashlib.sha256(b"advface-audit-scheme-key-id|" + scheme_key(seed)).hexdigest()[:16]


def biohash(templates: np.ndarray, key: bytes, bits: int | None = None) -> np.ndarray:
    """BioHashing (Teoh et al.): project onto ``bits`` (default D) random orthonormal directions seeded by ``key``,
    binarise by sign; written as +-1 / sqrt(bits), so the audit's cosine or Euclidean score is monotonic in the
    Hamming distance."""
    z = np.asarray(templates, np.float64)
    dim = z.shape[1]
    bits = dim if bits is None else bits
    if not 1 <= bits <= dim:
        raise ConfigError(f"biohash: bits must be in [1, {dim}], got {bits}")
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(b"biohash|" + key).digest()[:8], "big"))
    q, _ = np.linalg.qr(rng.standard_normal((dim, bits)))
    signs = np.where(z @ q >= 0, 1.0, -1.0)
    return (signs / np.sqrt(bits)).astype(np.float32)


def polyprotect(templates: np.ndarray, key: bytes, window: int = 5, overlap: int = 2) -> np.ndarray:
    """PolyProtect-style mapping (after Hahn and Marcel): each window of ``window`` consecutive elements (windows
    ``overlap`` elements apart from overlapping) becomes one value ``sum_j c_j * v_j ** e_j``, with non-zero integer
    coefficients ``c`` in [-50, 50] and distinct exponents ``e`` in 1..window drawn from ``key``; zero-padded at the
    end. D' = ceil((D - overlap) / (window - overlap)) values, compared by the encoder's score."""
    if not 0 <= overlap < window:
        raise ConfigError(f"polyprotect: overlap must be in [0, {window - 1}], got {overlap}")
    z = np.asarray(templates, np.float64)
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(b"polyprotect|" + key).digest()[:8], "big"))
    coefficients = rng.choice(np.r_[-50:0, 1:51], size=window, replace=False).astype(np.float64)
    exponents = rng.permutation(np.arange(1, window + 1))
    step = window - overlap
    count = max(1, -(-(z.shape[1] - overlap) // step))
    padded = np.zeros((z.shape[0], (count - 1) * step + window))
    padded[:, : z.shape[1]] = z
    starts = np.arange(count) * step
    windows = padded[:, starts[:, None] + np.arange(window)[None, :]]  # N x count x window
    return (windows**exponents * coefficients).sum(axis=2).astype(np.float32)


def mlphash(
    templates: np.ndarray, key: bytes, hidden: tuple[int, ...] = (256, 256), bits: int | None = None
) -> np.ndarray:
    """MLP-hash (after Shahreza and Marcel): a random multi-layer perceptron drawn from ``key`` (Gaussian weights,
    no biases, ReLU after each of the ``hidden`` layers), whose output layer of ``bits`` (default D) units is
    binarised by sign; written as +-1 / sqrt(bits) like :func:`biohash`."""
    z = np.asarray(templates, np.float64)
    bits = z.shape[1] if bits is None else bits
    if bits < 1 or any(h < 1 for h in hidden):
        raise ConfigError(f"mlphash: layer sizes must be >= 1, got hidden {hidden} and bits {bits}")
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(b"mlphash|" + key).digest()[:8], "big"))
    h = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    for width in hidden:
        h = np.maximum(h @ rng.standard_normal((h.shape[1], width)) / np.sqrt(h.shape[1]), 0.0)
    out = h @ rng.standard_normal((h.shape[1], bits))
    return (np.where(out >= 0, 1.0, -1.0) / np.sqrt(bits)).astype(np.float32)


#: The reference schemes of the package.
BIOHASH = ProtectionScheme("biohash", biohash, transforms_probes=True, identity="advface.audit.schemes:biohash|v1")
POLYPROTECT = ProtectionScheme(
    "polyprotect", polyprotect, transforms_probes=True, identity="advface.audit.schemes:polyprotect|v1"
)
MLPHASH = ProtectionScheme("mlphash", mlphash, transforms_probes=True, identity="advface.audit.schemes:mlphash|v1")
#: Schemes known by name.
SCHEMES = {s.name: s for s in (BIOHASH, POLYPROTECT, MLPHASH)}


def _as_scheme(obj: object, name: str) -> ProtectionScheme:
    if isinstance(obj, ProtectionScheme):
        return obj
    if callable(obj):
        return ProtectionScheme(name, obj, identity=name)
    raise ConfigError(f"scheme {name}: not a ProtectionScheme or a callable (templates, key) -> protected")


def load_scheme(spec: str) -> ProtectionScheme:
    """The scheme named by ``spec``: a name of :data:`SCHEMES`, ``MODULE:ATTR`` or an entry point of
    :data:`ENTRY_POINT_GROUP`."""
    if spec in SCHEMES:
        return SCHEMES[spec]
    if ":" not in spec:
        from importlib.metadata import entry_points

        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == spec]
        if not found:
            raise ConfigError(
                f"--scheme {spec!r}: not {', '.join(SCHEMES)}, MODULE:ATTR or an installed {ENTRY_POINT_GROUP} "
                "entry point"
            )
        spec = found[0].value
    module, _, attr = spec.partition(":")
    try:
        obj: object = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--scheme {spec!r}: cannot load it ({exc})") from exc
    return _as_scheme(obj, spec)


def _run_command(template: str, templates: np.ndarray, key: bytes) -> np.ndarray:
    """One call of a ``--protect-cmd`` command on ``templates`` (ids ``0..N-1``); its output rows by id."""
    with tempfile.TemporaryDirectory(prefix="advface-scheme-") as tmp:
        folder = Path(tmp)
        ids = [str(i) for i in range(len(templates))]
        src = save_embeddings(folder / "in.npz", EmbeddingsFile(ids, templates))
        dst = folder / "out.npz"
        key_file = folder / "key.hex"
        key_file.write_text(key.hex() + "\n")
        key_file.chmod(0o600)
        command = (
            template.replace("{in}", shlex.quote(str(src)))
            .replace("{out}", shlex.quote(str(dst)))
            .replace("{key}", shlex.quote(str(key_file)))
        )
        try:
            done = subprocess.run(
                command, shell=True, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise ConfigError(f"--protect-cmd ran over {COMMAND_TIMEOUT_S:.0f} s") from exc
        if done.returncode != 0:
            raise ConfigError(f"--protect-cmd exited {done.returncode}: {done.stderr.strip()[-500:]}")
        if not dst.is_file():
            raise ConfigError("--protect-cmd wrote no {out} file")
        try:
            out = load_embeddings(dst)
        except AdvfaceError as exc:
            raise ConfigError(f"--protect-cmd: {exc}") from exc
    rows = {i: r for r, i in enumerate(out.ids)}
    if sorted(rows) != sorted(ids):
        raise ConfigError(f"--protect-cmd: {len(out.ids)} ids out for {len(ids)} in, or other ids")
    return out.embeddings[[rows[i] for i in ids]]


def command_scheme(template: str, transforms_probes: bool = True) -> ProtectionScheme:
    """A scheme given only as a shell command: ``{in}`` and ``{out}`` (required) are embeddings files, ``{key}``
    (optional) a file holding the key as hex; run once per batch the audit protects."""
    if "{in}" not in template or "{out}" not in template:
        raise ConfigError("--protect-cmd needs {in} and {out} in the command")
    return ProtectionScheme(
        "command",
        lambda templates, key: _run_command(template, templates, key),
        transforms_probes=transforms_probes,
        identity="command|" + hashlib.sha256(template.encode()).hexdigest()[:16],
    )
