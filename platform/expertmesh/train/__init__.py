"""train: data, tokenizer, training specs and the Ray Train + DeepSpeed trainer for ExpertMesh models.

Kept light on purpose: import the submodules you need; importing this package pulls in
nothing heavy (no Ray, no DeepSpeed).

- ``corpus``, ``tokenizer``, ``data``: the stdlib corpus, the byte-level BPE, packed sharded data.
- ``spec``: ``TrainSpec`` (pydantic, YAML/JSON), presets ``demo`` and ``tiny``.
- ``objective``: ``TrainModel`` (main model + optional MTP head) and its losses.
- ``balance``: aux-loss-free gate-bias updates and the sequence-wise balance loss.
- ``mtp``: the depth-1 multi-token-prediction module and its V3 checkpoint names.
- ``checkpointing``: checkpoint layout, completion marker, world-size independent restore.
- ``loop``: the per-worker loop (DeepSpeed), free of Ray behind a ``WorkerSession``.
- ``monitor``: run-directory records, the metrics buffer, the loss plot.
- ``trainer``: ``train(spec, out_dir, workers=None, steps=None) -> TrainResult`` on Ray Train.
"""
