"""The synthetic head world (issue 15): a known world in which StyleMask can be trained and checked.

Built so far: `world.render`, a deterministic z-buffered rasteriser with Lambertian shading in plain
PyTorch, using DECA's orthographic camera (`stylemask.project`) so that rendered pixels and FLAME
landmarks share one image space; and `world.head`, a parametric head in FLAME's format (named shape and
expression components, jaw by FLAME's joint, a per-vertex albedo for skin, hair, eyes, brows and lips);
and `world.sample`, seeded identities (shape + appearance) and views (yaw ±45°, pitch ±20°, roll ±15°,
jaw, expression) rendered with exact labels. To come: the world's networks and `python -m world.build`.
"""
