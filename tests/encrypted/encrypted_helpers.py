"""Helpers of the encrypted-matching tests (imported by name: the tests folder is on sys.path)."""

from __future__ import annotations

import numpy as np

from advface.encrypted.keys import SecretKeys


def decrypt_values(keys: SecretKeys, cipher) -> np.ndarray:  # noqa: ANN001
    """Test helper: the slot values of a ciphertext (what only the key service can do)."""
    import tenseal.sealapi as seal

    plain = seal.Plaintext()
    keys.decryptor().decrypt(cipher, plain)
    return np.asarray(seal.CKKSEncoder(keys.public.context).decode_double(plain))
