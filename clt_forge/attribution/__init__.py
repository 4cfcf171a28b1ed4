"""Attribution graphs from a trained CLT through circuit-tracer (the `clt attribute` stage).

convert.py       checkpoint -> circuit-tracer CrossLayerTranscoder (normalisation folded), export
replacement.py   a loaded HookedTransformer + the converted CLT -> circuit-tracer ReplacementModel
interventions.py set or scale features / clusters and read the new top logits
runner.py        AttributionRunner: the paper's API, used by `clt attribute`

The graph JSON format lives in `clt_forge.artifacts.graph`.
"""
