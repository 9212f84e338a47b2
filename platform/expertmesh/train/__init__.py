"""train: data, tokenizer, training specs and (elsewhere) the trainer for ExpertMesh models.

Kept light on purpose: import the submodules you need (``expertmesh.train.corpus``,
``expertmesh.train.tokenizer``, ``expertmesh.train.data``, ``expertmesh.train.spec``);
importing this package pulls in nothing heavy.
"""
