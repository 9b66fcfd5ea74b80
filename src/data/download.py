"""Download the rating datasets from their official sources and verify every file's checksum before use."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from src.runtime.cache import default_cache_dir
from src.runtime.errors import OneLineParser, UserError

CHUNK_SIZE = 1 << 20
DATA_ENV_VAR = "ALIGNFEDREC_DATA"
# the data this project reads, beside the repository (its README gives provenance and checksums)
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@dataclass(frozen=True)
class FileSpec:
    """One file to take from a dataset archive, with the digests it must have."""

    member: str
    target: str
    sha256: str | None = None
    git_blob: str | None = None

    def __post_init__(self) -> None:
        """Reject specs that could not be verified or would write outside the dataset folder."""
        if self.sha256 is None and self.git_blob is None:
            raise ValueError(f"{self.target}: a FileSpec needs a sha256 or a git_blob digest")
        if not self.target or PurePosixPath(self.target).name != self.target or self.target in {".", ".."}:
            raise ValueError(f"target must be a plain file name, got {self.target!r}")

    def expected_digests(self) -> dict[str, str]:
        """Map algorithm name to expected hex digest, for every digest this spec has."""
        digests = {"sha256": self.sha256, "git_blob": self.git_blob}
        return {algo: value.lower() for algo, value in digests.items() if value is not None}


@dataclass(frozen=True)
class DatasetSource:
    """A dataset's official archive URL and the files to extract from it."""

    name: str
    url: str
    files: tuple[FileSpec, ...]


SOURCES: dict[str, DatasetSource] = {
    "ml-100k": DatasetSource(
        name="ml-100k",
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        files=(
            FileSpec(
                "ml-100k/u.data",
                "u.data",
                sha256="06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
                git_blob="16ef21ed827cae1a3f71e89e23cffb5a8f44baae",
            ),
            FileSpec(
                "ml-100k/u.item",
                "u.item",
                sha256="553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
                git_blob="91bb56d53fcb5f8bbac079755593b48d34cfc9a7",
            ),
            FileSpec(
                "ml-100k/u.user",
                "u.user",
                sha256="f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
                git_blob="53d296f961959ad3a9389a6bbd7e8251aeeb6e17",
            ),
            FileSpec(
                "ml-100k/README",
                "README",
                sha256="4883b8cf340ed0059971b33f56ad3adc88a40792108ebca3d24aafc4c82e8b52",
                git_blob="04ad704706f0290e503b863a00aebd4589e1e072",
            ),
        ),
    ),
    "ml-1m": DatasetSource(
        name="ml-1m",
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        files=(
            FileSpec("ml-1m/ratings.dat", "ratings.dat", git_blob="77a7c4b150f588c23bb9e1f068aa996c0b413695"),
            FileSpec(
                "ml-1m/movies.dat",
                "movies.dat",
                sha256="0140fc2356357c1a851d0f52e893a1e4d3696df632c4141cea8d5bc3d621f0b9",
                git_blob="9a735435722829dad68446ef1c30d001d5d00c1d",
            ),
            FileSpec(
                "ml-1m/users.dat",
                "users.dat",
                sha256="1dc3a95300cb19f7c10e027daf29b8cdf1d908dab65b5edfb45950aa389a10a3",
                git_blob="2f86be06c70946984c0d5d56f9fcaa658eef139e",
            ),
            FileSpec(
                "ml-1m/README",
                "README",
                sha256="2d5ddce86ccbd247207456165827b4b9ddf27282bca93807d4c763e28414f133",
                git_blob="3d0acab0029027ec47ef446ad12210f0d2c2a9f6",
            ),
        ),
    ),
    "filmtrust": DatasetSource(
        name="filmtrust",
        url="https://guoguibing.github.io/librec/datasets/filmtrust.zip",
        files=(
            FileSpec(
                "ratings.txt",
                "ratings.txt",
                sha256="5aba3481d6eecfd1275e49d50eaa6d3525fa0afd95c91b30ec832390af8a6f9c",
                git_blob="a3b2ab499521c593c86eee3296a954dc6510f271",
            ),
            FileSpec(
                "trust.txt",
                "trust.txt",
                sha256="64573a033add72b988a0fb140fdbc0ad3464cb9821f940007aff6fda44b09603",
                git_blob="453890b13a6f576e942e2e371245f425b33871df",
            ),
        ),
    ),
    "lastfm-2k": DatasetSource(
        name="lastfm-2k",
        url="https://files.grouplens.org/datasets/hetrec2011/hetrec2011-lastfm-2k.zip",
        files=(
            FileSpec(
                "user_taggedartists.dat",
                "user_taggedartists.dat",
                sha256="d31fe938fcfeed6f0059f37a36b156f63674d073fc2553e5cc9dc1595e365bc7",
                git_blob="767d371c20243df3deeae24ede577570e5e60566",
            ),
            FileSpec(
                "user_artists.dat",
                "user_artists.dat",
                sha256="001400dc3c7d2667fca6e4ea6dc6acc31a9dd28ad5cd0f74cea988c019934d3b",
                git_blob="e01e8d142e3df2a58a89d33598616658dd136dc7",
            ),
            FileSpec(
                "artists.dat",
                "artists.dat",
                sha256="c173881362c6b28551368fecb3c0be5a6a30a6cd859e1f5775413dfe46d48648",
                git_blob="c33103eeaf8f7024748f5b370d6689d9e61ab1e0",
            ),
            FileSpec(
                "tags.dat",
                "tags.dat",
                sha256="e95175f259be4c0c47644ae23d66131cd6d5767142a1405000e79f5584691d70",
                git_blob="33dc23bcddbc42c0ab48be744152d356c63d66d6",
            ),
        ),
    ),
}


# Files no archive in SOURCES holds but a reader uses: the partial ML-1M files of ../shared/data (see its README).
EXTRA_FILES: dict[str, tuple[FileSpec, ...]] = {
    "ml-1m": (
        FileSpec(
            "chronological_order.tsv.gz",
            "chronological_order.tsv.gz",
            sha256="8a1d303126316516a3f25c41b88047ad265b8cd79dbebcdce76d1e8dd7249239",
            git_blob="ab5de0ea1246355b54324fd5c99313f4c508f34b",
        ),
        FileSpec(
            "pfedrec_loo_split.tsv",
            "pfedrec_loo_split.tsv",
            sha256="0c563f62008e9f5174b642ea31d7faaf185e64f3dd581c05def49e87c41ef7b9",
            git_blob="1b62deeb5a0ea9119f97d56c4c258b3d7a8f5984",
        ),
    ),
}

# (dataset, file name) -> the digests every local copy of that file must have, wherever it was found.
KNOWN_FILES: dict[tuple[str, str], FileSpec] = {
    (name, spec.target): spec
    for name, specs in [*((s.name, s.files) for s in SOURCES.values()), *EXTRA_FILES.items()]
    for spec in specs
}

DOWNLOAD_COMMAND = "python -m src.data.download"


class DataIntegrityError(UserError, ValueError):
    """A local dataset file is not the release its known digests name, so no split is built from it."""

    def __init__(
        self,
        path: Path | str,
        dataset: str,
        algorithm: str | None = None,
        expected: str | None = None,
        found: str | None = None,
    ) -> None:
        """Build a message naming the file, the expected and found digest, and how to get a good copy."""
        self.path = path
        self.dataset = dataset
        self.algorithm = algorithm
        self.expected = expected
        self.found = found
        name = Path(path).name
        if expected is None:
            problem = (
                f"{path} has no known digest (no entry ({dataset!r}, {name!r}) in KNOWN_FILES of "
                f"src/data/download.py), so it cannot be verified."
            )
        else:
            problem = (
                f"{path} is not the known {dataset} file {name}: {algorithm} expected {expected}, "
                f"found {found}. It was modified, truncated or is another version."
            )
        super().__init__(
            f"{problem} Get a good copy with `{DOWNLOAD_COMMAND} {dataset} --dest {Path(path).parent.parent}`, "
            f"or restore it from the source listed in ../shared/data/README.md; "
            f"to use deliberately modified data, pass data.verify=false."
        )


class ChecksumError(UserError, ValueError):
    """A file's digest differs from the registry, so the file must not be used."""

    def __init__(self, path: Path | str, algorithm: str, expected: str, found: str, url: str | None = None) -> None:
        """Build a message naming the file, the digests and how to get a good copy."""
        self.path = path
        self.algorithm = algorithm
        self.expected = expected
        self.found = found
        self.url = url
        source = url if url else "its official source"
        super().__init__(
            f"checksum mismatch for {path}: {algorithm} expected {expected}, found {found}. "
            f"The file is corrupt or not the official release. To get a good copy, delete the file "
            f"and re-run so it is downloaded again from {source}, or point `data.root` / "
            f"{DATA_ENV_VAR} at a verified copy."
        )


def file_digests(path: Path | str) -> tuple[str, str]:
    """Return (sha256 hex, git blob id) of a file in one streaming pass, without reading it whole."""
    sha256 = hashlib.sha256()
    blob = hashlib.sha1()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        blob.update(b"blob %d\0" % size)
        read = 0
        while chunk := fh.read(CHUNK_SIZE):
            sha256.update(chunk)
            blob.update(chunk)
            read += len(chunk)
    if read != size:
        raise OSError(f"{path} changed size while being hashed ({size} -> {read} bytes)")
    return sha256.hexdigest(), blob.hexdigest()


def digest_mismatch(expected: FileSpec, digests: tuple[str, str]) -> tuple[str, str, str] | None:
    """(algorithm, expected, found) of the first digest that differs from the spec, or None when all match."""
    found = dict(zip(("sha256", "git_blob"), digests))
    for algorithm, digest in expected.expected_digests().items():
        if found[algorithm] != digest:
            return algorithm, digest, found[algorithm]
    return None


def verify_file(path: Path | str, expected: FileSpec, *, url: str | None = None) -> None:
    """Raise ChecksumError unless the file matches every digest the spec has."""
    mismatch = digest_mismatch(expected, file_digests(path))
    if mismatch is not None:
        raise ChecksumError(path, *mismatch, url)


def verify_known(dataset: str, path: Path | str, digests: tuple[str, str]) -> None:
    """Raise DataIntegrityError unless `digests` (from `file_digests(path)`) are those KNOWN_FILES lists for it."""
    spec = KNOWN_FILES.get((dataset, Path(path).name))
    if spec is None:
        raise DataIntegrityError(path, dataset)
    mismatch = digest_mismatch(spec, digests)
    if mismatch is not None:
        raise DataIntegrityError(path, dataset, *mismatch)


def _resolve_source(name: str | DatasetSource) -> DatasetSource:
    """Look a dataset up in SOURCES, or pass an explicit DatasetSource through."""
    if isinstance(name, DatasetSource):
        return name
    try:
        return SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(SOURCES))}") from None


def verify_dataset(name: str | DatasetSource, folder: Path) -> list[Path]:
    """Verify the registry files present in `folder` and return their paths; missing files are skipped."""
    source = _resolve_source(name)
    verified = []
    for spec in source.files:
        path = Path(folder) / spec.target
        if path.is_file():
            verify_file(path, spec, url=source.url)
            verified.append(path)
    return verified


def _is_complete(source: DatasetSource, folder: Path) -> bool:
    """Tell whether every registry file is present in `folder` with the right digests."""
    try:
        return len(verify_dataset(source, folder)) == len(source.files)
    except ChecksumError:
        return False


class DownloadError(UserError, RuntimeError):
    """A dataset archive could not be fetched (no network, a moved URL): one line saying how to supply it by hand."""


def _fetch(url: str, target: Path, timeout: float) -> None:
    """Stream `url` into the file `target`, turning network failures into a DownloadError."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(target, "wb") as out:
            shutil.copyfileobj(response, out, CHUNK_SIZE)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise DownloadError(
            f"could not download {url}: {exc}; expected the dataset under ../shared/data ({SHARED_DATA}), or the "
            f"archive downloaded "
            f"by hand and extracted, with `data.root` (or ${DATA_ENV_VAR}) set to the folder that holds its folder"
        ) from exc


def _find_member(archive: zipfile.ZipFile, member: str) -> zipfile.ZipInfo:
    """Find `member` by exact path, else by a unique basename anywhere in the archive."""
    infos = [info for info in archive.infolist() if not info.is_dir()]
    for info in infos:
        if info.filename == member:
            return info
    basename = PurePosixPath(member).name
    matches = [
        info
        for info in infos
        if PurePosixPath(info.filename).name == basename and not info.filename.startswith("__MACOSX/")
    ]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise DownloadError(f"archive has no member {member!r}; expected the archive of the dataset's source")
    names = ", ".join(info.filename for info in matches)
    raise DownloadError(f"archive has several members named {basename!r}: {names}; expected exactly one")


def _extract_verified(source: DatasetSource, archive_path: Path, staging: Path, url: str) -> None:
    """Extract the registry files into `staging` and verify each one, raising on any mismatch."""
    try:
        with zipfile.ZipFile(archive_path) as archive:
            for spec in source.files:
                info = _find_member(archive, spec.member)
                staged = staging / spec.target
                with archive.open(info) as src, open(staged, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK_SIZE)
                try:
                    verify_file(staged, spec, url=url)
                except ChecksumError as exc:
                    raise ChecksumError(
                        f"{spec.target} (member {info.filename} of {url})", exc.algorithm, exc.expected, exc.found, url
                    ) from None
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{url} did not give a valid zip archive: {exc}; expected a zip file") from exc


def download(name: str | DatasetSource, dest_root: Path, *, url: str | None = None, timeout: float = 60.0) -> Path:
    """Fetch a dataset archive, verify its files and move them into `dest_root/<name>/`; return that folder.

    `name` is a key of SOURCES or an explicit DatasetSource (e.g. with other digests, for tests);
    `url` overrides the source's URL. Nothing is downloaded when every file is already present
    and verified, and nothing is written to the dataset folder unless every file verifies.
    """
    source = _resolve_source(name)
    archive_url = url or source.url
    dest_root = Path(dest_root)
    folder = dest_root / source.name
    if _is_complete(source, folder):
        return folder
    dest_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{source.name}-", suffix=".part", dir=dest_root))
    try:
        archive_path = work / "archive.zip"
        staging = work / "files"
        staging.mkdir()
        _fetch(archive_url, archive_path, timeout)
        _extract_verified(source, archive_path, staging, archive_url)
        folder.mkdir(exist_ok=True)
        for spec in source.files:
            os.replace(staging / spec.target, folder / spec.target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: download and verify the named datasets into a data root."""
    parser = OneLineParser(description=__doc__)
    parser.add_argument("datasets", nargs="+", choices=sorted(SOURCES), help="datasets to fetch")
    parser.add_argument("--dest", type=Path, default=None, help="data root to fill (default: <cache dir>/data)")
    parser.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds")
    args = parser.parse_args(argv)
    dest = args.dest if args.dest is not None else default_cache_dir() / "data"
    for dataset in args.datasets:
        print(download(dataset, dest, timeout=args.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
