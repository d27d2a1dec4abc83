"""The audit's attack zoo: decoder inversions (:mod:`.decoder`), the GAN-prior latent search (:mod:`.gan_prior`) and
the adaptive attacker trained on protected templates (:mod:`.adaptive`)."""
