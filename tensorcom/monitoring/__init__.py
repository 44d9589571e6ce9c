"""What the tools measure and draw: throughput of a receiving client (tensormon), array statistics and plots
(tensorstat), image grids (tensorshow). No zmq."""
