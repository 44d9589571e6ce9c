# The tensorcom 0.1 README's commands, run on this project as the README types them:
#
#     $ serve-imagenet-dir -d /data/imagenet -b 64 zpub://127.0.0.1:7880
#     training = tensorcom.Connection("zsub://127.0.0.1:7880", epoch=1000000)   (train_loop.py)
#     more publishers: zpub://127.0.0.1:788{0..3} and zsub://127.0.0.1:788{0..3}
#     tensormon, tensorshow, tensorstat (no URL: they read zsub://127.0.0.1:7880, or 788{0..3} for tensorshow)
#     IPC transport: zpush+ipc://mypath
#
# Filled in where the README leaves it to the reader (each marked "filled in"):
# - /data/imagenet: a small generated folder of real JPEGs (tensorcom.datasets.sample_images);
# - the ports: the README's 7880-7883 by default; `--port P` uses P..P+3 instead (for machines where they are taken,
#   and for the test suite); with another port the tools get the URL on their command line;
# - each server runs until the commands reading it are done, then gets SIGTERM (the README starts them by hand).
#
# Usage: python examples/tensorcom01/readme_commands.py [--port P] [--folder DIR]
# Prints one line per command and "all README commands ran" at the end; exits non-zero at the first failure.
import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tensorcom.datasets.sample_images import make_sample_images

BIN = Path(sys.executable).parent  # the programs installed beside this interpreter
TRAIN_LOOP = Path(__file__).with_name("train_loop.py")


def start(*args):
    """Start a server program; return it once it prints its ready line."""
    process = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line.startswith("ready"):
        process.kill()
        sys.exit(f"{args[0]} did not start: {line!r}")
    print(f"$ {' '.join(args)}\n  {line.strip()}", flush=True)
    return process


def run(*args):
    """Run a client command (a program installed beside this interpreter, or train_loop.py) to its end and show
    its last line of output."""
    command = [sys.executable, str(TRAIN_LOOP)] if args[0] == TRAIN_LOOP.name else [str(BIN / args[0])]
    result = subprocess.run([*command, *args[1:]], capture_output=True, text=True, timeout=300)
    last = (result.stdout.strip().splitlines() or [""])[-1]
    print(f"$ {' '.join(args)}\n  {last}", flush=True)
    if result.returncode != 0:
        sys.exit(f"{args[0]} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout


def stop(process):
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


def main():
    parser = argparse.ArgumentParser(description="Run the tensorcom 0.1 README's commands.")
    parser.add_argument("--port", type=int, default=7880, help="first of four ports (the README's: 7880)")
    parser.add_argument(
        "--folder", default=None, help="where to write the sample images (default: a temp folder)"
    )
    args = parser.parse_args()
    folder = args.folder or tempfile.mkdtemp(prefix="tensorcom01-")
    images = make_sample_images(folder, classes=3, per_class=8, size=48)  # filled in: /data/imagenet
    port = args.port
    url = f"127.0.0.1:{port}"
    readme_port = port == 7880

    # $ serve-imagenet-dir -d /data/imagenet -b 64 zpub://127.0.0.1:7880
    server = start("serve-imagenet-dir", "-d", images, "-b", "64", f"zpub://{url}")
    try:
        # training = tensorcom.Connection("zsub://127.0.0.1:7880", epoch=1000000); for xs, ys in training: ...
        run(TRAIN_LOOP.name, f"zsub://{url}", "3")
        # tensormon / tensorstat: with no URL they read zsub://127.0.0.1:7880
        run("tensormon", "-c", "5", *([] if readme_port else [f"zsub://{url}"]))
        run("tensorstat", "-c", "3", *([] if readme_port else [f"zsub://{url}"]))
        # tensorshow: "show images from input batches" (a PNG here: there may be no display)
        picture = os.path.join(folder, "tensorshow.png")
        run("tensorshow", "-o", picture, f"zsub://{url}")
    finally:
        stop(server)

    # more publishers: zpub://127.0.0.1:788{0..3} and zsub://127.0.0.1:788{0..3}
    braces = f"127.0.0.1:{{{port}..{port + 3}}}"
    server = start("serve-imagenet-dir", "-d", images, "-b", "64", f"zpub://{braces}")
    try:
        run(TRAIN_LOOP.name, f"zsub://{braces}", "8")
        run("tensormon", "-c", "8", f"zsub://{braces}")
    finally:
        stop(server)

    # Default transport is TCP/IP, but you can choose IPC as in zpush+ipc://mypath
    path = os.path.join(folder, "mypath")
    with subprocess.Popen(  # filled in: the client binds the ipc path, the server pushes into it
        [sys.executable, str(TRAIN_LOOP), f"zpull+ipc://{path}", "3"], stdout=subprocess.PIPE, text=True
    ) as loop:
        server = start("serve-imagenet-dir", "-d", images, "-b", "64", f"zpush+ipc://{path}")
        try:
            out, _ = loop.communicate(timeout=300)
        finally:
            stop(server)
        print(f"$ train_loop.py zpull+ipc://{path} 3\n  {out.strip().splitlines()[-1]}", flush=True)
        if loop.returncode != 0:
            sys.exit("the training loop over ipc failed")
    print("all README commands ran")


if __name__ == "__main__":
    main()
