"""What the tools measure and draw: throughput of a receiving client (tensormon), array statistics (tensorstat),
image grids (tensorshow), and the charts of tensorstat and tensormon ``--plot`` (matplotlib, loaded on first use).
No zmq."""
