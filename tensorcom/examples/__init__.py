"""Example programs that use the whole stack (``python -m tensorcom.examples.imagenet_demo``)."""
