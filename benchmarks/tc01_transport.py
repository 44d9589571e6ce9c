"""tensorcom 0.1.0's side of the transport benchmark, run by its own interpreter (see bench_transport.py).

python tc01_transport.py send ADDRESS COUNT SHAPE       PUSH (binds) COUNT batches of uint8 SHAPE + labels
python tc01_transport.py receive ADDRESS COUNT SHAPE    PULL (connects); prints [seconds, cpu seconds, peak RSS MB, 0]

Like every receiver of the transport benchmark, it reads one byte of every 4 KB page of each batch.
"""

import json
import sys
import time

import numpy as np


def url(scheme, address):
    return address.replace("tcp://", scheme + "://") if address.startswith("tcp") else scheme + "+" + address


def peak_rss_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return 0.0


def touch(arrays):
    return sum(int(a.reshape(-1).view(np.uint8)[::4096].sum()) for a in arrays)


def main(role, address, count, shape):
    from tensorcom.zcom import Connection

    count = int(count)
    shape = tuple(int(d) for d in shape.split(","))
    if role == "send":
        connection = Connection(url("zrpush", address))
        batch = [
            np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8),
            np.arange(64, dtype=np.int64),
        ]
        for _ in range(count):
            connection.send(batch, allow64=True)
        time.sleep(30)
        return
    connection = Connection(url("zrpull", address))
    touch(connection.recv())
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(count - 1):
        touch(connection.recv())
    print(json.dumps([time.perf_counter() - start, time.process_time() - cpu, peak_rss_mb(), 0]))


if __name__ == "__main__":
    main(*sys.argv[1:])
