# The tensorcom 0.1 README's training loop, run on this project: only the import line changed
# (`import tensorcom` became `import tensorcom.zcom as tensorcom`, since this project's own
# tensorcom.Connection has other semantics: its `epoch=` ends the loop).
#
# The README's loop, as it stands there:
#
#     training = tensorcom.Connection("zsub://127.0.0.1:7880", epoch=1000000)
#     for xs, ys in training:
#         train_batch(xs, ys)
#
# Filled in where the README leaves the work to the user (each part marked "filled in"):
# - train_batch: prints what arrived, one line per batch, instead of training a model;
# - the URL and a batch count come from the command line, and the loop stops after that many batches (0.1's
#   iteration never ends on its own, and neither does this one's).
#
# Usage: python examples/tensorcom01/train_loop.py [URL] [BATCHES]
#   URL defaults to the README's zsub://127.0.0.1:7880, BATCHES to 100. Start a server first, as the README does,
#   e.g. `serve-imagenet-dir -d /data/imagenet -b 64 zpub://127.0.0.1:7880` (or `serve-synthetic -b 64
#   zpub://127.0.0.1:7880`, which needs no images).
import sys

import tensorcom.zcom as tensorcom  # tensorcom 0.1: import tensorcom

URL = sys.argv[1] if len(sys.argv) > 1 else "zsub://127.0.0.1:7880"  # filled in
BATCHES = int(sys.argv[2]) if len(sys.argv) > 2 else 100  # filled in
received = 0  # filled in


def train_batch(xs, ys):  # filled in
    global received
    received += 1
    print(f"batch {received}: xs {xs.dtype} {list(xs.shape)} ys {ys.dtype} {list(ys.shape)}", flush=True)


training = tensorcom.Connection(URL, epoch=1000000)
for xs, ys in training:
    train_batch(xs, ys)
    if received >= BATCHES:  # filled in
        break
training.close()  # filled in
