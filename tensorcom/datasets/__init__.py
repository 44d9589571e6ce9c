"""Datasets and the pipelines that serve them: image folders and tar shards (imagenet), synthetic batches, and
generated sample images. No zmq: the servers run these pipelines, the datasets know nothing of servers."""
