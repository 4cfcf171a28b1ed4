"""Automatic interpretability of CLT features (the `clt autointerp` stage).

collect.py     the streaming pass: top-K contexts, samples, statistics per feature
source.py      whole context windows from an activation dataset or the model on the fly
prompts.py     explanation and detection prompts
explainers.py  local HF model / OpenAI-compatible endpoint
scoring.py     detection scores (balanced accuracy on held-out contexts)
runner.py      AutoInterp: the steps in order, resumable

The feature database and the feature JSON files are formats in `clt_forge.artifacts`
(features.py, feature_json.py).
"""
