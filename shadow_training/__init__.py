"""The shadow-training pipeline: a public face dataset in, a shadow inversion model S (embedding -> face) out.

S stands in for the attacker in AdvFace protection. The pipeline's stages are the library's
(:mod:`advface.datasets.pairs`, :mod:`advface.datasets.splits`, :mod:`advface.inversion.training`); this package
only runs them in order for ``advface train-shadow`` (:func:`shadow_training.pipeline.train_shadow`).
"""
