"""The encrypted gallery: templates as CKKS ciphertexts in column packing, scored against plaintext probes.

**Packing.** Templates are grouped in *blocks* of ``N/2`` slots (4096 with the default parameters). A block holds one
ciphertext per *column*: column ``j`` encrypts value ``j`` of every template of the block, template ``s`` in slot
``s``. A probe ``p`` scores a whole block with ``columns`` plaintext-scalar products and additions, no rotation and
no relinearisation (the sidecar holds no evaluation keys at all), giving one *score ciphertext* whose slot ``s``
is the score of template ``s``:

- ``cosine``: templates and probe are normalised, columns are their values; the score is the cosine similarity;
- ``euclidean``: one more column holds ``|t|^2``; the score is ``2<p, t> - |t|^2 - |p|^2 = -|p - t|^2``
  (the key service turns it into ``-|p - t|``, the store's Euclidean score).

**Enrolment.** New templates take free slots (lowest block first, new blocks at the end). For every block they
touch, each column gets one fresh public-key encryption of a vector that holds the new values at their slots and
zeros elsewhere, added homomorphically: a batch costs ``columns`` encryptions per block touched, whatever its size.

**Deletion.** Nothing but the secret key can change one slot of a ciphertext without the plaintext, so removal is
in two steps: :meth:`EncryptedGallery.remove` marks the slots *dead* at once (never scored or released again), and
a *refresh* (:meth:`EncryptedGallery.refresh_job` / :meth:`EncryptedGallery.finish_refresh`) erases them: the
sidecar adds a uniform random mask to every column, the key service decrypts the masked values (it sees only
``t + r``), zeroes the dead slots and re-encrypts, and the sidecar subtracts its mask. Afterwards the dead slots are
encryptions of zero and free for new templates.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from advface.encoders.base import validate_embeddings
from advface.encrypted._seal import from_bytes, require, to_bytes
from advface.encrypted.keys import PublicKeys
from advface.encrypted.memory import scrub_caches, wipe, wipe_floats, wipe_plaintext
from advface.errors import ConfigError, EmbeddingError, IntegrityError, NotFoundError, PreconditionError

__all__ = ["FREE", "LIVE", "DEAD", "EncryptedGallery", "RefreshJob", "ScoreCiphertext", "SlotRef"]

GalleryMetric = Literal["cosine", "euclidean"]
FREE, LIVE, DEAD = 0, 1, 2


@dataclass(frozen=True, order=True)
class SlotRef:
    """Where one template lives: block index and slot."""

    block: int
    slot: int


@dataclass(frozen=True)
class ScoreCiphertext:
    """The encrypted scores of one block for one probe, and the slots the request is about."""

    block: int
    ciphertext: Any
    slots: tuple[int, ...]

    def to_bytes(self) -> bytes:
        return to_bytes(self.ciphertext)


@dataclass
class RefreshJob:
    """One block being erased through the key service: the masked columns to send and the zeroed slots.
    The masks stay here, in the sidecar's memory only."""

    block: int
    generation: int
    masked: list[bytes]
    zero_slots: tuple[int, ...]
    masks: np.ndarray = field(repr=False)


@dataclass
class _Block:
    columns: list[Any]
    state: np.ndarray
    generation: int = 0


class EncryptedGallery:
    """Column-packed CKKS ciphertexts of templates of dimension ``dim`` under ``keys`` (public key only).

    Thread-safe: changes build new ciphertexts and swap them in under a lock; scoring works on a snapshot.
    """

    def __init__(self, keys: PublicKeys, dim: int, metric: GalleryMetric = "cosine") -> None:
        if metric not in ("cosine", "euclidean"):
            raise ConfigError(f"encrypted gallery metric must be cosine or euclidean, got {metric!r}")
        if not isinstance(dim, int) or not 1 <= dim <= 4096:
            raise ConfigError(f"encrypted gallery dim must be an integer in [1, 4096], got {dim!r}")
        self.seal = require()
        self.keys = keys
        self.params = keys.params
        self.dim = dim
        self.metric: GalleryMetric = metric
        self.columns = dim + (1 if metric == "euclidean" else 0)
        self.slots = self.params.slots
        self._context = keys.context
        self._parms_id = keys.context.first_parms_id()
        self._encoder = self.seal.CKKSEncoder(keys.context)
        self._encryptor = keys.encryptor()
        self._evaluator = self.seal.Evaluator(keys.context)
        self._blocks: list[_Block] = []
        self._lock = threading.RLock()
        self._zeros = [0.0] * self.slots
        #: byte sizes of the small numpy buffers a template or probe occupies (float32 / float64, with or without
        #: the norm column): the buckets of numpy's cache that :meth:`scrub` overwrites
        self._cache_sizes = {width * n for width in (4, 8) for n in (dim, self.columns)}

    # ------------------------------------------------------------------ sizes

    @property
    def block_count(self) -> int:
        return len(self._blocks)

    def count(self) -> int:
        """Live templates."""
        with self._lock:
            return int(sum(int((b.state == LIVE).sum()) for b in self._blocks))

    def state(self, block: int) -> np.ndarray:
        """A copy of a block's slot states (FREE, LIVE, DEAD)."""
        with self._lock:
            return self._blocks[block].state.copy()

    def generation(self, block: int) -> int:
        with self._lock:
            return self._blocks[block].generation

    def live_slots(self) -> list[SlotRef]:
        with self._lock:
            return [SlotRef(i, int(s)) for i, b in enumerate(self._blocks) for s in np.flatnonzero(b.state == LIVE)]

    def dirty_blocks(self) -> list[int]:
        """Blocks holding dead (removed but not yet erased) slots."""
        with self._lock:
            return [i for i, b in enumerate(self._blocks) if (b.state == DEAD).any()]

    # ------------------------------------------------------------------ encoding

    def template_values(self, vectors: Any) -> np.ndarray:
        """The column values (``N x columns`` float64) stored for ``vectors``; EmbeddingError for bad vectors.

        The result is the only new buffer holding the values (no temporaries): the caller wipes it
        (:func:`advface.encrypted.memory.wipe`) once it is encrypted."""
        x = validate_embeddings(vectors, self.dim)
        out = np.empty((len(x), self.columns))
        try:
            out[:, : self.dim] = x  # cast in place: no float64 temporary
        finally:
            if not _same_memory(x, vectors):
                wipe(x)  # validate_embeddings made a float32 copy
        norms = np.empty(len(out))
        for i, row in enumerate(out[:, : self.dim]):  # one dot product per row: no temporary of squares
            norms[i] = np.sqrt(np.dot(row, row))
        if self.metric == "cosine":
            for i, row in enumerate(out):
                row /= norms[i]
            wipe(norms)
            return out
        too_big = norms > self.params.max_norm
        if too_big.any():
            wipe(out, norms)
            rows = np.flatnonzero(too_big)[:10].tolist()
            raise EmbeddingError(
                f"rows {rows} have a norm above the encrypted gallery's max_norm {self.params.max_norm}"
            )
        np.multiply(norms, norms, out=out[:, self.dim])
        wipe(norms)
        return out

    def probe_coefficients(self, probe: Any) -> tuple[np.ndarray, float]:
        """The quantised plaintext coefficients of each column and the constant added to every score (the caller
        wipes the coefficients once encoded)."""
        p = validate_embeddings(probe, self.dim)
        if len(p) != 1:
            raise EmbeddingError(f"expected one probe vector, got {len(p)}")
        v = np.empty(self.dim)
        v[:] = p[0]
        if not _same_memory(p, probe):
            wipe(p)
        scale = self.params.probe_scale
        norm = float(np.sqrt(np.dot(v, v)))
        if self.metric == "cosine":
            v /= norm
            v *= scale
            np.round(v, out=v)
            v /= scale
            return v, 0.0
        if norm > self.params.max_norm:
            wipe(v)
            raise EmbeddingError(f"probe norm is above the encrypted gallery's max_norm {self.params.max_norm}")
        coef = np.empty(self.columns)
        doubled = coef[: self.dim]
        np.multiply(v, 2.0 * scale, out=doubled)
        wipe(v)
        np.round(doubled, out=doubled)
        doubled /= scale
        coef[self.dim] = -1.0
        constant = -float(np.dot(doubled, doubled)) / 4.0  # |doubled / 2|^2
        return coef, constant

    def _encode(self, values: list[float], scale: float) -> Any:
        plain = self.seal.Plaintext()
        self._encoder.encode(values, self._parms_id, scale, plain)
        return plain

    def _encode_scalar(self, value: float, scale: float) -> Any:
        plain = self.seal.Plaintext()
        self._encoder.encode(value, self._parms_id, scale, plain)
        return plain

    def _scrub_encoder(self) -> None:
        """Overwrite the encoder's scratch memory in SEAL's pool (the last encoding's transform) with zeros."""
        wipe_plaintext(self._encode(self._zeros, self.params.template_scale))

    def scrub(self) -> None:
        """After a call that handled plaintext values: overwrite SEAL's encoding scratch and the calling thread's
        allocator caches (:mod:`advface.encrypted.memory`)."""
        self._scrub_encoder()
        scrub_caches(self._cache_sizes)

    # ------------------------------------------------------------------ changes

    def add(self, vectors: Any) -> list[SlotRef]:
        """Encrypt and enrol ``vectors`` (``N x dim``); their slots, in order. All or nothing."""
        values = self.template_values(vectors)
        with self._lock:
            refs = self._free_slots(len(values))
            by_block: dict[int, list[int]] = {}
            for row, ref in enumerate(refs):
                by_block.setdefault(ref.block, []).append(row)
            staged: dict[int, _Block] = {}
            try:
                for block, rows in by_block.items():
                    staged[block] = self._added_block(block, rows, refs, values)
            finally:
                wipe(values)
                self.scrub()
            for block in sorted(staged):
                if block < len(self._blocks):
                    self._blocks[block] = staged[block]
                else:
                    self._blocks.append(staged[block])
            return refs

    def _added_block(self, block: int, rows: list[int], refs: list[SlotRef], values: np.ndarray) -> _Block:
        """Block ``block`` with ``values[rows]`` encrypted into their slots (one encryption per column, added)."""
        slots = [refs[r].slot for r in rows]
        existing = self._blocks[block] if block < len(self._blocks) else None
        state = existing.state.copy() if existing else np.zeros(self.slots, np.uint8)
        state[slots] = LIVE
        sub = values[rows]  # our copy: wiped below
        columns = []
        try:
            for c in range(self.columns):
                floats = sub[:, c].tolist()  # the only Python objects holding the values: wiped after encoding
                vec = list(self._zeros)  # one shared 0.0 elsewhere
                for s, f in zip(slots, floats):
                    vec[s] = f
                try:
                    plain = self._encode(vec, self.params.template_scale)
                finally:
                    wipe_floats(floats)
                    del vec, floats
                delta = self.seal.Ciphertext(self._context)
                try:
                    self._encryptor.encrypt(plain, delta)
                finally:
                    wipe_plaintext(plain)
                if existing is not None:
                    out = self.seal.Ciphertext(self._context)
                    self._evaluator.add(existing.columns[c], delta, out)
                    delta = out
                columns.append(delta)
        finally:
            wipe(sub)
        return _Block(columns, state, existing.generation + 1 if existing else 0)

    def _free_slots(self, n: int) -> list[SlotRef]:
        refs: list[SlotRef] = []
        for i, existing in enumerate(self._blocks):
            for s in np.flatnonzero(existing.state == FREE)[: n - len(refs)]:
                refs.append(SlotRef(i, int(s)))
            if len(refs) == n:
                return refs
        index = len(self._blocks)
        while len(refs) < n:
            take = min(self.slots, n - len(refs))
            refs.extend(SlotRef(index, s) for s in range(take))
            index += 1
        return refs

    def remove(self, refs: Iterable[SlotRef]) -> None:
        """Mark live slots dead (never scored again); their values stay encrypted until a refresh erases them.
        NotFoundError (nothing changed) when a slot is not live."""
        refs = list(refs)
        with self._lock:
            for ref in refs:
                if not (0 <= ref.block < len(self._blocks)) or self._blocks[ref.block].state[ref.slot] != LIVE:
                    raise NotFoundError(f"encrypted gallery slot {ref.block}:{ref.slot} holds no template")
            for ref in refs:
                block = self._blocks[ref.block]
                state = block.state.copy()
                state[ref.slot] = DEAD
                self._blocks[ref.block] = _Block(block.columns, state, block.generation + 1)

    # ------------------------------------------------------------------ scoring

    def score(self, probe: Any, refs: Sequence[SlotRef] | None = None, *, threads: int = 1) -> list[ScoreCiphertext]:
        """Encrypted scores of ``probe`` against the live templates (or only ``refs``, which must be live), one
        ciphertext per block involved, computed on ``threads`` threads."""
        coef, constant = self.probe_coefficients(probe)
        with self._lock:
            blocks = list(self._blocks)
        wanted: dict[int, list[int]] = {}
        if refs is None:
            for i, b in enumerate(blocks):
                live = np.flatnonzero(b.state == LIVE)
                if len(live):
                    wanted[i] = live.tolist()
        else:
            for ref in refs:
                if not (0 <= ref.block < len(blocks)) or blocks[ref.block].state[ref.slot] != LIVE:
                    wipe(coef)
                    raise NotFoundError(f"encrypted gallery slot {ref.block}:{ref.slot} holds no template")
                wanted.setdefault(ref.block, []).append(ref.slot)
        plains: list[tuple[int, Any]] = []
        constant_plain = None
        values = coef.tolist()
        try:
            for c, value in enumerate(values):
                if value != 0.0:
                    plains.append((c, self._encode_scalar(value, self.params.probe_scale)))
            if constant != 0.0:
                constant_plain = self._encode_scalar(constant, self.params.score_scale)
        finally:
            wipe_floats([*values, constant])
            wipe(coef)
            del values
        if not plains:  # pragma: no cover - a normalised probe always has a coefficient above 2**-19
            raise EmbeddingError("probe rounds to zero at the probe scale")

        def one(block: int) -> ScoreCiphertext:
            columns = blocks[block].columns
            acc = self.seal.Ciphertext(self._context)
            tmp = self.seal.Ciphertext(self._context)
            first, rest = plains[0], plains[1:]
            self._evaluator.multiply_plain(columns[first[0]], first[1], acc)
            for c, plain in rest:
                self._evaluator.multiply_plain(columns[c], plain, tmp)
                self._evaluator.add_inplace(acc, tmp)
            if constant_plain is not None:
                self._evaluator.add_plain_inplace(acc, constant_plain)
            return ScoreCiphertext(block, acc, tuple(sorted(wanted[block])))

        order = sorted(wanted)
        try:
            if threads > 1 and len(order) > 1:
                with ThreadPoolExecutor(max_workers=threads) as pool:
                    return list(pool.map(one, order))
            return [one(b) for b in order]
        finally:
            for _, plain in plains:
                wipe_plaintext(plain)
            if constant_plain is not None:
                wipe_plaintext(constant_plain)
            scrub_caches(self._cache_sizes)

    # ------------------------------------------------------------------ erasure

    def mask_bits(self) -> int:
        """Bits of the uniform masks of a refresh: as large as the data prime leaves room for at the template
        scale (the key service sees ``t + r`` with ``|r| < 2**mask_bits``)."""
        return self.params.coeff_bits[0] - 3 - self.params.template_scale_bits

    def refresh_job(self, block: int) -> RefreshJob:
        """Masked copies of a block's columns for the key service to re-encrypt with every non-live slot zeroed."""
        bits = self.mask_bits()
        if bits < 8:
            raise ConfigError(f"CKKS parameters leave {bits} bits for refresh masks; at least 8 are needed")
        with self._lock:
            if not 0 <= block < len(self._blocks):
                raise NotFoundError(f"encrypted gallery block {block} does not exist")
            current = self._blocks[block]
        rng = np.random.default_rng(secrets.randbits(128))
        bound = float(2**bits)
        masks = rng.uniform(-bound, bound, size=(self.columns, self.slots))
        masked = []
        for c in range(self.columns):
            plain = self.seal.Plaintext()
            self._encoder.encode(masks[c].tolist(), self._parms_id, self.params.template_scale, plain)
            out = self.seal.Ciphertext(self._context)
            self._evaluator.add_plain(current.columns[c], plain, out)
            masked.append(to_bytes(out))
        zero = tuple(int(s) for s in np.flatnonzero(current.state != LIVE))
        return RefreshJob(block, current.generation, masked, zero, masks)

    def finish_refresh(self, job: RefreshJob, columns: Sequence[bytes]) -> int:
        """Install the key service's re-encrypted columns (minus the masks); returns how many slots became free.
        PreconditionError when the block changed since the job began (nothing installed; start again)."""
        fresh = self.unmask(job, columns)
        with self._lock:
            current = self._blocks[job.block]
            if current.generation != job.generation:
                raise PreconditionError(f"encrypted gallery block {job.block} changed during its refresh; start again")
            state = current.state.copy()
            freed = int((state == DEAD).sum())
            state[state != LIVE] = FREE
            self._blocks[job.block] = _Block(fresh, state, current.generation + 1)
        return freed

    def unmask(self, job: RefreshJob, columns: Sequence[bytes]) -> list[Any]:
        """The key service's re-encrypted columns of ``job`` loaded under this gallery's key pair, minus the masks
        (which were zeroed with the erased slots). A rotation calls it on the gallery of the *new* key pair."""
        if len(columns) != self.columns:
            raise IntegrityError(f"refresh of block {job.block}: {len(columns)} columns returned, {self.columns} sent")
        keep = np.ones(self.slots)
        keep[list(job.zero_slots)] = 0.0
        fresh = []
        for c, data in enumerate(columns):
            cipher = self.load_ciphertext(data, f"refresh of block {job.block}, column {c}")
            plain = self.seal.Plaintext()
            self._encoder.encode((job.masks[c] * keep).tolist(), self._parms_id, self.params.template_scale, plain)
            self._evaluator.sub_plain_inplace(cipher, plain)
            fresh.append(cipher)
        return fresh

    # ------------------------------------------------------------------ persistence hooks

    def load_ciphertext(self, data: bytes, what: str, scale: float | None = None) -> Any:
        """A ciphertext of this key pair at the data level and ``scale`` (template scale by default);
        IntegrityError naming ``what`` otherwise."""
        cipher = from_bytes(self.seal.Ciphertext, self._context, data, what)
        expected = self.params.template_scale if scale is None else scale
        if cipher.size() != 2 or cipher.parms_id() != self._parms_id or cipher.scale != expected:
            raise IntegrityError(f"{what}: not a template ciphertext of this key pair (size, level or scale)")
        return cipher

    def export_block(self, block: int) -> tuple[int, np.ndarray, list[bytes]]:
        """``(generation, slot states, serialised columns)`` of a block."""
        with self._lock:
            b = self._blocks[block]
        return b.generation, b.state.copy(), [to_bytes(c) for c in b.columns]

    def import_block(self, block: int, generation: int, state: np.ndarray, columns: Sequence[Any]) -> None:
        """Install a block read back from storage (ciphertexts already checked); blocks are appended in order."""
        state = np.asarray(state, np.uint8)
        if state.shape != (self.slots,) or len(columns) != self.columns or not np.isin(state, (FREE, LIVE, DEAD)).all():
            raise IntegrityError(f"encrypted gallery block {block}: wrong shape")
        with self._lock:
            if block != len(self._blocks):
                raise IntegrityError(f"encrypted gallery block {block} read out of order")
            self._blocks.append(_Block(list(columns), state.copy(), int(generation)))


def _same_memory(array: np.ndarray, given: Any) -> bool:
    """Whether ``array`` is (a view of) the caller's ``given`` array, which is not ours to wipe."""
    return isinstance(given, np.ndarray) and np.shares_memory(array, given)
