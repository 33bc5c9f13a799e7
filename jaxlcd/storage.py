"""Where a run's files live: a local path or cloud storage (``gs://bucket/path``), behind one small layer.

Every file a run writes in its workdir (config.json, metrics.jsonl, TensorBoard, grids, exports, checkpoints)
goes through here or through a library that understands the same URLs (orbax/tensorstore for checkpoints,
tensorboardX for event files). Remote paths use `etils.epath` (gcsfs underneath).

Two things stay on local disk even for a remote workdir, in `local_dir` (``JAXLCD_CACHE`` or ~/.cache/jaxlcd):
the prepared training data (array_record files are read with local file I/O) and the tiny variant's random models.
Model and data folders given as ``gs://`` are copied once into ``JAXLCD_CACHE/gcs/<bucket>/<path>`` (`local_copy`):
safetensors are memory-mapped from local files.

A GCS emulator is used when ``STORAGE_EMULATOR_HOST`` is set (gcsfs and google-cloud-storage read it; tensorstore
is pointed at it by `configure_emulator`).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import shutil
import tempfile

from jaxlcd.errors import InputError

log = logging.getLogger("jaxlcd")


class StorageError(InputError):
    """A cloud-storage path that cannot be used (missing bucket, no credentials, unreachable service)."""


def is_remote(path) -> bool:
    """True for URLs such as ``gs://bucket/run``."""
    return "://" in str(path)


def absolute(path: str) -> str:
    """``path`` as an absolute local path (user-expanded), or the URL unchanged."""
    return path if not path or is_remote(path) else os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def epath(path):
    """An `etils.epath.Path` for a local path or URL."""
    if is_remote(path):
        configure_emulator()
        logging.getLogger("gcsfs").setLevel(logging.ERROR)  # one "bucket type" warning per call otherwise
    from etils import epath as epath_lib
    return epath_lib.Path(path)


def configure_emulator() -> None:
    """With ``STORAGE_EMULATOR_HOST`` set, point tensorstore (orbax's array writer) at the same emulator, with the
    test token it accepts; gcsfs and google-cloud-storage read the variable themselves."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host:
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host if "://" in host else f"http://{host}")
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")


def exists(path: str) -> bool:
    return epath(path).exists() if is_remote(path) else os.path.exists(path)


def makedirs(path: str) -> None:
    if is_remote(path):
        epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def open_file(path: str, mode: str = "r", **kwargs):
    """A file object for reading or writing (``"r"``, ``"rb"``, ``"w"``, ``"wb"``; append only locally)."""
    if is_remote(path):
        return epath(path).open(mode, **kwargs)
    return open(path, mode, **kwargs)


def read_text(path: str) -> str:
    with open_file(path, encoding="utf-8") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Write a whole text file: locally through a temporary file and a rename (a reader never sees half of it);
    a cloud object is replaced whole by its upload anyway."""
    if is_remote(path):
        with open_file(path, "w", encoding="utf-8") as f:
            f.write(text)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def rmtree(path: str) -> None:
    """Remove a folder (tree) if it exists."""
    if is_remote(path):
        p = epath(path)
        if p.exists():
            p.rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def publish_dir(src: str, dest: str, marker: str) -> None:
    """Replace folder ``dest`` by the finished local folder ``src`` (``src`` is consumed). Locally one rename (``src``
    should sit beside ``dest``); on cloud storage the old ``dest`` is removed and the files uploaded with ``marker``
    (a file name in ``src``) last, so a reader that sees the marker sees a complete folder."""
    if not is_remote(dest):
        rmtree(dest)
        os.rename(src, dest)
        return
    rmtree(dest)
    upload_tree(src, dest, last=marker)
    shutil.rmtree(src, ignore_errors=True)


def upload_tree(src: str, dest: str, last: str | None = None) -> None:
    """Copy every file under local folder ``src`` to ``dest`` (a URL), overwriting; the file named ``last`` (relative
    to ``src``) is copied last."""
    files = sorted(os.path.relpath(os.path.join(root, n), src) for root, _, names in os.walk(src) for n in names)
    for rel in sorted(files, key=lambda r: r == last):
        target = epath(join(dest, *rel.split(os.sep)))
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(os.path.join(src, rel), "rb") as f_in, target.open("wb") as f_out:
            shutil.copyfileobj(f_in, f_out)


def cache_root() -> str:
    return os.path.expanduser(os.environ.get("JAXLCD_CACHE", "~/.cache/jaxlcd"))


def local_dir(workdir: str) -> str:
    """A local folder for what a run keeps on disk: ``workdir`` itself when local, else
    ``JAXLCD_CACHE/runs/<bucket>/<path>-<hash>`` (created)."""
    if not is_remote(workdir):
        return workdir
    scheme, rest = workdir.split("://", 1)
    tag = hashlib.sha1(workdir.encode()).hexdigest()[:8]
    out = os.path.join(cache_root(), "runs", scheme, *rest.strip("/").split("/")) + f"-{tag}"
    os.makedirs(out, exist_ok=True)
    return out


def local_copy(path: str, key: str = "path") -> str:
    """A local folder holding the files of ``path``: ``path`` itself when local, else a copy downloaded once into
    ``JAXLCD_CACHE/gcs/<bucket>/<path>`` (a ``.complete`` marker makes an interrupted copy start again). ``key``
    names the setting in errors."""
    if not is_remote(path):
        return path
    src = epath(path)
    check_bucket(path, key)
    if not src.is_dir():
        raise StorageError(f"{key}={path!r} is not a folder on cloud storage")
    scheme, rest = path.split("://", 1)
    dest = os.path.join(cache_root(), scheme, *rest.strip("/").split("/"))
    if os.path.isfile(os.path.join(dest, ".complete")):
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    log.info("copying %s to %s", path, dest)
    for file in _walk_files(src):
        rel = os.path.join(*str(file)[len(str(src)):].strip("/").split("/"))
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        with file.open("rb") as f_in, open(os.path.join(dest, rel), "wb") as f_out:
            shutil.copyfileobj(f_in, f_out)
    open(os.path.join(dest, ".complete"), "w").close()
    return dest


def _walk_files(folder):
    for child in folder.iterdir():
        if child.is_dir():
            yield from _walk_files(child)
        else:
            yield child


def check_bucket(path: str, key: str = "workdir") -> None:
    """One sentence (StorageError) when the bucket of URL ``path`` cannot be used: no credentials, or no such
    bucket (or no access to it). Local paths pass."""
    if not is_remote(path):
        return
    scheme, rest = path.split("://", 1)
    if scheme != "gs":
        raise StorageError(f"{key}={path!r}: only local paths and gs:// are supported")
    bucket = rest.split("/", 1)[0]
    if not os.environ.get("STORAGE_EMULATOR_HOST"):
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError
        try:
            google.auth.default()
        except DefaultCredentialsError:
            raise StorageError(f"{key}={path!r} is on Google Cloud Storage but no credentials were found; run "
                               "`gcloud auth application-default login` (or set GOOGLE_APPLICATION_CREDENTIALS)") \
                from None
    try:
        found = epath(f"gs://{bucket}").exists()
    except Exception as e:   # gcsfs/aiohttp raise many types for network and auth failures
        raise StorageError(f"{key}={path!r}: cannot reach Google Cloud Storage ({type(e).__name__}: {e})") from None
    if not found:
        raise StorageError(f"{key}={path!r}: the bucket gs://{bucket} does not exist or this account cannot see "
                           f"it; create it with `gcloud storage buckets create gs://{bucket}`")


@contextlib.contextmanager
def staged_dir(dest: str, marker: str):
    """A local folder to write into that ends up at ``dest`` (uploaded on exit, file ``marker`` last, when ``dest``
    is remote)."""
    if not is_remote(dest):
        yield dest
        return
    tmp = tempfile.mkdtemp(prefix="jaxlcd-upload-")
    try:
        yield tmp
        publish_dir(tmp, dest, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
