"""Downloading BEIR collections: the published archives, checked against their MD5, extracted safely."""

from __future__ import annotations

import hashlib
import shutil
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from sbmoe.core.errors import DataError
from sbmoe.core.io import atomic_directory, atomic_open

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"

# MD5 of each archive as published in the dataset table of the BEIR README (beir-cellar/beir).
# fever and webis-touche2020 list the checksums of the re-released archives, which are what the
# server hands out now; the first README versions listed those of the superseded ones.
BEIR_MD5: dict[str, str] = {
    "msmarco": "444067daf65d982533ea17ebd59501e4",
    "trec-covid": "ce62140cb23feb9becf6270d0d1fe6d1",
    "nfcorpus": "a89dba18a62ef92f7d323ec890a0d38d",
    "nq": "d4d3d2e48787a744b6f6e691ff534307",
    "hotpotqa": "f412724f78b0d91183a0e86805e16114",
    "fiqa": "17918ed23cd04fb15047f73e6c3bd9d9",
    "arguana": "8ad3e3c2a5867cdced806d6503f29b99",
    "webis-touche2020": "46f650ba5a527fc69e0a6521c5a23563",
    "cqadupstack": "4e41456d7df8ee7760a7f866133bda78",
    "quora": "18fb154900ba42a600f84b839c173167",
    "dbpedia-entity": "c2a39eb420a3164af735795df012ac2c",
    "scidocs": "38121350fc3a4d2f48850f6aff52e4a9",
    "fever": "5a818580227bfb4b35bb6fa46d9b6c03",
    "climate-fever": "8b66f0a9126c521bae2bde127b4dc99d",
    "scifact": "5f7d1de60b170fc8027bb7898e2efca1",
}


@dataclass(frozen=True)
class DownloadSource:
    """Where known collections are downloaded from, and how their archives are checked.

    Attributes:
        url_template: Archive URL with a ``{name}`` placeholder (any scheme urllib opens).
        checksums: Name -> archive MD5 of the downloadable collections.
        timeout: Seconds to wait on the network.
    """

    url_template: str = BEIR_URL
    checksums: Mapping[str, str] = field(default_factory=lambda: BEIR_MD5)
    timeout: float = 60.0


BEIR_SOURCE = DownloadSource()
"""The BEIR archives at their published address."""


def download_collection(name: str, url: str, md5: str, cache: Path, timeout: float) -> Path:
    """Fetch ``url``, check its MD5 and extract it into ``cache/name``, which appears only once complete.

    Raises:
        DataError: checksum mismatch, or an archive without a corpus or with unsafe paths.
        OSError, http.client.HTTPException, zipfile.BadZipFile: the download failed.
    """
    from tqdm.auto import tqdm  # only needed on this rare path

    archive = cache / f".{name}.zip"
    digest = hashlib.md5(usedforsecurity=False)
    try:
        # atomic_open keeps the partial file under a temporary name; raising inside the block
        # (checksum mismatch, network error) deletes it, so a bad archive is never left behind.
        with urllib.request.urlopen(url, timeout=timeout) as response, atomic_open(archive, "wb") as out:
            size = response.headers.get("Content-Length")
            with tqdm(
                total=int(size) if size else None, unit="B", unit_scale=True, desc=f"{name}.zip", leave=False
            ) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if digest.hexdigest() != md5:
                raise DataError(f"MD5 mismatch: expected {md5}, got {digest.hexdigest()}")
        target = cache / name
        with atomic_directory(target) as staging, zipfile.ZipFile(archive) as zipped:
            _extract(zipped, staging, name)
        return target
    finally:
        archive.unlink(missing_ok=True)


def _extract(zipped: zipfile.ZipFile, dest: Path, name: str) -> None:
    """Extract into ``dest``, dropping the archive's single top-level folder (``scifact/...``)."""
    members = [m for m in zipped.infolist() if not m.is_dir()]
    parts = []
    for member in members:
        path = PurePosixPath(member.filename.replace("\\", "/"))
        # Refuse members that would land outside dest ("zip slip").
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise DataError(f"unsafe path in archive: {member.filename!r}")
        parts.append(path.parts)
    tops = {p[0] for p in parts}
    strip = len(tops) == 1 and all(len(p) > 1 for p in parts)
    for member, member_parts in zip(members, parts, strict=True):
        out = dest.joinpath(*(member_parts[1:] if strip else member_parts))
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipped.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    # cqadupstack nests one collection per forum, so a corpus one level down counts too.
    if not (dest / "corpus.jsonl").is_file() and not any(dest.glob("*/corpus.jsonl")):
        raise DataError(f"archive for {name!r} holds no corpus.jsonl")
