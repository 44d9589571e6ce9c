"""Framework adapters: a torch ``IterableDataset`` and device transfer, and a Keras ``PyDataset``, over a
:class:`tensorcom.Connection`. Each imports its framework only when used."""
