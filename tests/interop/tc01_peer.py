"""Run by tensorcom 0.1's interpreter (a separate virtual environment): the original's side of the interop check.

python tc01_peer.py serve URL N      send N known batches with tensorcom 0.1's Connection.serve
python tc01_peer.py receive URL N    receive N batches with tensorcom 0.1 and check their content
python tc01_peer.py save PATH        write a .ten file with tensorcom 0.1
python tc01_peer.py load PATH        read a .ten file with tensorcom 0.1 and check its content
python tc01_peer.py loop URL N       the 0.1 README's loop, `for xs, ys in Connection(URL, epoch=...)`, for N
                                     batches: one line per batch, "SHAPE DTYPE LABELS" (JSON)
"""

import sys
import time

import numpy as np


def batch(i):
    return [
        np.full((2, 3, 4), i, dtype=np.uint8),
        np.arange(5, dtype=np.float32) + i,
        np.array([i, -i], dtype=np.int64),
    ]


def check(arrays, i):
    expected = batch(i)
    if len(arrays) != len(expected) or not all(
        a.dtype == e.dtype and a.shape == e.shape and np.array_equal(a, e)
        for a, e in zip(arrays, expected, strict=True)
    ):
        sys.exit(f"batch {i} differs: {arrays!r}")


def main(command, target, count=3):
    from tensorcom import tenbin
    from tensorcom.zcom import Connection

    count = int(count)
    if command == "serve":
        connection = Connection(target)
        time.sleep(0.5)
        for i in range(count):
            connection.send(batch(i), allow64=True)  # its serve() ignores allow64 and refuses int64
        time.sleep(1.0)
    elif command == "receive":
        connection = Connection(target)
        for i in range(count):
            check(connection.recv(), i)
    elif command == "loop":
        import json

        training = Connection(target, epoch=1000000)
        for i, (xs, ys) in enumerate(training):
            print(json.dumps([list(xs.shape), str(xs.dtype), ys.tolist()]), flush=True)
            if i + 1 == count:
                break
    elif command == "save":
        tenbin.save(target, *batch(7))
    elif command == "load":
        check(tenbin.load(target), 7)
    print("ok")


if __name__ == "__main__":
    main(*sys.argv[1:])
