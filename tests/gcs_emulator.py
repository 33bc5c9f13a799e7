"""A local Google Cloud Storage API for the tests: gcp-storage-emulator on 127.0.0.1.

    python tests/gcs_emulator.py PORT BUCKET     # serves until killed; BUCKET exists from the start

One addition to the emulator: its media downloads lack the ``x-goog-generation`` header that real GCS sends, which
tensorstore (orbax's checkpoint writer) reads to version what it caches; without it every checkpoint read fails with
"Malformed StorageGeneration". The header is added from the object's own metadata, nothing else changes.
"""
import logging
import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects


_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # not found: the download handler has answered 404
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = _download_with_generation   # also reached from the JSON API's GET ...?alt=media
for _, handlers in server.HANDLERS:
    for method, fn in list(handlers.items()):
        if fn is _download:
            handlers[method] = _download_with_generation


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    port, bucket = int(sys.argv[1]), sys.argv[2]
    server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()
