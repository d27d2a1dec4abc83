"""Shadow training: (embedding, face) pairs from a face dataset, identity-disjoint splits, and decoder training.

The shadow inversion network S (embedding -> face) stands in for the attacker in AdvFace protection; the same code
trains the attackers of audits on other identities.
"""
