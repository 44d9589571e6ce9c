# The three source examples of SPDL's "Pipeline Stages" document, run on tensorcom; the document imports nothing
# for them (it works in `spdl.dataloader`, whose PipelineBuilder is imported here from `tensorcom.pipeline`).
#
# Fixed in the seed: in `list_bucket`, `client = client.connect()` makes `client` a local name, so the call reads it
# before it is assigned (UnboundLocalError); the connection gets a name of its own.
# Filled in (marked "filled in"): the imports the snippets use; a file of paths, a folder of files and the
# "imaginary client" (the smallest real one: a "bucket" is a local folder, listed without blocking the event loop);
# and each source fed to a pipeline, whose output is printed as one JSON line.
import asyncio
import json
import os
import tempfile
from collections.abc import AsyncIterator  # filled in
from pathlib import Path  # filled in

from tensorcom.pipeline import PipelineBuilder  # filled in


# fmt: off
# - Load a list of paths from a file.
def load_path_from_file(input_path: str):
    with open(input_path, "r") as f:  # noqa: UP015
        for line in f:
            if path := line.strip():
                yield path


# - Files in directories
def find_files(path: Path, ext: str):
    yield from path.glob(f'**/*{ext}')
# fmt: on


class FolderClient:
    """Filled in: the imaginary client, as the smallest real one (a bucket is a local folder)."""

    def connect(self) -> "FolderClient":
        return self

    async def list_bucket(self, bucket: str) -> AsyncIterator[str]:
        for name in sorted(await asyncio.to_thread(os.listdir, bucket)):
            yield f"{bucket}/{name}"


client = FolderClient()  # filled in


# - Asynchronously list files in remote storage
# Using some imaginary client
async def list_bucket(bucket: str) -> AsyncIterator[str]:
    connection = client.connect()  # fixed: was `client = client.connect()`
    async for route in connection.list_bucket(bucket):
        yield route


def size_of(path: str | Path) -> int:
    """Filled in: an op for the pipelines below."""
    return os.path.getsize(path)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="spdl-sources-") as folder:  # filled in: files to find
        root = Path(folder)
        for i in range(6):
            (root / ("a" if i % 2 else "b")).mkdir(exist_ok=True)
            (root / ("a" if i % 2 else "b") / f"{i}.jpg").write_bytes(b"x" * (i + 1))
        (root / "a" / "notes.txt").write_text("not an image")
        (root / "paths.txt").write_text("\n".join(str(p) for p in sorted(root.glob("*/*.jpg"))) + "\n\n")

        from_file = (
            PipelineBuilder()
            .add_source(load_path_from_file(str(root / "paths.txt")))
            .pipe(size_of)
            .add_sink(3)
            .build()
        )
        from_folders = (
            PipelineBuilder()
            .add_source(find_files(root, ".jpg"))
            .pipe(size_of, concurrency=2)
            .add_sink(3)
            .build()
        )
        from_bucket = (
            PipelineBuilder().add_source(list_bucket(str(root / "a"))).pipe(size_of).add_sink(3).build()
        )
        results = {}
        for name, pipeline in (("file", from_file), ("folders", from_folders), ("bucket", from_bucket)):
            with pipeline.auto_stop():
                results[name] = sorted(pipeline.get_iterator(timeout=60))
        print(json.dumps(results), flush=True)
