"""Contracts shared by the pipeline's stages: the artifact layout, the manifest, text conventions.

Data flows one way: ``training`` writes ``artifacts/``, ``export`` reads it and writes
``artifacts/onnx/``, ``service`` reads the exported models. Each stage imports this package,
never another stage.
"""
