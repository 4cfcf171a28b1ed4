"""The `clt cache` stage: run the model over text and write an activation dataset, one
resumable job per shard, merged when the last one finishes (writer). The dataset's format,
codecs and reader live in `clt_forge.artifacts`; `ActivationsStore` in `clt_forge.data`."""
