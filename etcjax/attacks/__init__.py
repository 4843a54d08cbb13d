"""Attacks on encrypted images and the registry the `etcjax attack` command uses.

Modules: `fr` (feature reconstruction, ciphertext-only), `jigsaw` (jigsaw-puzzle solver
on EtC blocks), `kpa` (known-plaintext key recovery), `itn` (inverse-transformation
network), `gan` (reduced SIA-GAN-style generator), `blockstates` (the 96 EtC block
states), `photos` (bundled real photos for training and evaluation).
"""
