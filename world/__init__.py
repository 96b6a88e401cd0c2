"""The synthetic head world: a small known world in which StyleMask is trained, shown working and checked.

Real StyleGAN2-FFHQ, ArcFace and DECA weights cannot be downloaded on the machines this is built on, so
the scripts' default is a world where everything is known. Its parts, in the order they build on each other:

    head       a parametric head in FLAME's format (named shape and expression components, the jaw by
               FLAME's joint, 68 landmarks, an albedo for skin, hair, eyes, brows and lips)
    render     a deterministic z-buffered rasteriser with Lambertian shading on DECA's camera
    sample     seeded identities and views with exact labels, and the generator's prior: the head a
               latent z names (`from_z`)
    generator  a StyleGAN2 generator in our format, trained to render from z the head z names
    encoders   a DECA E_flame and an ArcFace IR-SE network, trained on renders with exact labels
    fit        the resumable training loop they share
    quality    the quality gates: encoder, identity verification, generator fidelity

A library below the scripts: `python build_world.py` (the top-level script) trains all of it, then the mask
networks with train.py's own loop, and installs them into weights/world/ as every script's default.

The world shows the method on rendered heads; it says nothing about real faces, which need the official
weights (weights/README.md).
"""
