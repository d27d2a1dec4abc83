"""Encrypted matching: templates stored as CKKS ciphertexts, scored against plaintext probes, decided by a key service.

The sidecar (and its database) hold only the public key: they can encrypt templates and compute *encrypted scores*
of a plaintext probe against the encrypted gallery, but they cannot read a template or a score. A separate key
service holds the secret key; it decrypts only score results that the sidecar bound to its request (HMAC, fresh
nonce, the key service's own threshold) and releases decisions (Verify: a match bit; Identify: the top-k slots
above its threshold), rate-limited and audited. See docs/encrypted-matching.md.

Modules (each small and single-purpose):

- :mod:`advface.encrypted.params` -- CKKS parameters, their checks and the SEAL context;
- :mod:`advface.encrypted.keys` -- key generation, the sidecar's and the key service's key folders (0600 files);
- :mod:`advface.encrypted.gallery` -- the column-packed encrypted gallery: add, remove, score, erase (refresh);
- :mod:`advface.encrypted.blocks` -- the on-disk format of a gallery block (authenticated, tamper detection);
- :mod:`advface.encrypted.binding` -- requests to the key service and their HMAC binding, replay protection;
- :mod:`advface.encrypted.keyservice` -- the key service's core: bound score results in, decisions out;
- :mod:`advface.encrypted.ratelimit`, :mod:`advface.encrypted.audit` -- its rate limit and audit log;
- :mod:`advface.encrypted.requests` -- the sidecar's side: score a probe, bind the request, map decisions to slots;
- :mod:`advface.encrypted.client`, :mod:`advface.encrypted.wire` -- the gRPC client of ``advface keyservice`` and
  the message conversions (these two import grpc; the server is ``server/keyservice.py``);
- :mod:`advface.encrypted.store` -- ``store.matching: encrypted``: the SQLite store of encrypted templates.

Needs the ``encrypted`` extra (``pip install 'advface[encrypted]'``, TenSEAL's build of Microsoft SEAL); importing
this package without it raises :class:`~advface.errors.ConfigError` only when a module that needs SEAL is used.
"""
