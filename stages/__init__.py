"""The pipeline's stages: one typed config and one `run(config)` each (DESIGN §1).

This directory sits at the top of the repository and installs as `batctl.stages` (DESIGN §2).
A stage reads like a recipe: setup, load, loop, save. Model-family differences belong in
`batctl.tasks`, math in `batctl.influence`; a stage only orchestrates.
"""
