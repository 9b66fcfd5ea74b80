"""Tests for the checksum-verifying dataset downloader, with local archives only (no internet)."""

from __future__ import annotations

import hashlib
import http.server
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from src.data.download import (
    KNOWN_FILES,
    SOURCES,
    ChecksumError,
    DatasetSource,
    DownloadError,
    FileSpec,
    download,
    file_digests,
    main,
    verify_dataset,
)
from src.runtime.cache import default_cache_dir

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

FAKE_FILES = {
    "ratings.csv": b"1,10,5\n2,20,3\n3,30,4\n",
    "items.csv": b"10,alpha\n20,beta\n30,gamma\n",
}

U_DATA_SHA256 = "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490"
U_DATA_GIT_BLOB = "16ef21ed827cae1a3f71e89e23cffb5a8f44baae"


def sha256_of(data: bytes) -> str:
    """Independent sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def git_blob_of(data: bytes) -> str:
    """Independent git blob id of a byte string, as `git hash-object` prints it."""
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


def make_source(url: str = "http://example.invalid/fake.zip", prefix: str = "fake/") -> DatasetSource:
    """A DatasetSource for the fake archive, with digests computed here with hashlib."""
    return DatasetSource(
        name="fake",
        url=url,
        files=(
            FileSpec(prefix + "ratings.csv", "ratings.csv", sha256=sha256_of(FAKE_FILES["ratings.csv"])),
            FileSpec(prefix + "items.csv", "items.csv", git_blob=git_blob_of(FAKE_FILES["items.csv"])),
        ),
    )


def make_archive(path: Path, files: dict[str, bytes], prefix: str = "fake/") -> Path:
    """Write a zip archive holding `files` under `prefix`, plus an unrelated member."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(prefix + name, data)
        archive.writestr(prefix + "unrelated.txt", b"not registered\n")
    return path


class _Server:
    """A local HTTP server over one folder that counts the requests it answers."""

    def __init__(self, root: Path) -> None:
        """Start serving `root` on 127.0.0.1 in a background thread."""
        self.requests = 0
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self) -> None:
                server.requests += 1
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        """URL of a file in the served folder."""
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/{name}"

    def close(self) -> None:
        """Stop the server and its thread."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    """A local HTTP server over tmp_path/served."""
    root = tmp_path / "served"
    root.mkdir()
    srv = _Server(root)
    yield srv
    srv.close()


def all_files(folder: Path) -> list[Path]:
    """Every file (not folder) below `folder`, hidden ones included."""
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_download_over_http_extracts_and_verifies(tmp_path: Path, server: _Server) -> None:
    make_archive(tmp_path / "served" / "fake.zip", FAKE_FILES)
    dest = tmp_path / "dest"
    folder = download(make_source(), dest, url=server.url("fake.zip"))
    assert folder == dest / "fake"
    assert all_files(dest) == [folder / "items.csv", folder / "ratings.csv"]
    for name, data in FAKE_FILES.items():
        assert (folder / name).read_bytes() == data
    assert server.requests == 1


def test_download_from_file_url_finds_members_by_basename(tmp_path: Path) -> None:
    archive = make_archive(tmp_path / "nested.zip", FAKE_FILES, prefix="release-v2/data/")
    source = make_source(url=archive.as_uri(), prefix="")
    folder = download(source, tmp_path / "dest")
    assert sorted(p.name for p in folder.iterdir()) == ["items.csv", "ratings.csv"]
    assert verify_dataset(source, folder) == [folder / "ratings.csv", folder / "items.csv"]


def test_corrupted_member_raises_and_writes_nothing(tmp_path: Path, server: _Server) -> None:
    corrupted = dict(FAKE_FILES, **{"ratings.csv": b"1,10,1\n2,20,3\n3,30,4\n"})
    make_archive(tmp_path / "served" / "fake.zip", corrupted)
    dest = tmp_path / "dest"
    with pytest.raises(ChecksumError) as info:
        download(make_source(), dest, url=server.url("fake.zip"))
    message = str(info.value)
    assert "ratings.csv" in message
    assert sha256_of(FAKE_FILES["ratings.csv"]) in message
    assert sha256_of(corrupted["ratings.csv"]) in message
    assert "data.root" in message
    assert all_files(dest) == []
    assert not (dest / "fake").exists()


def test_corrupted_git_blob_member_is_caught(tmp_path: Path) -> None:
    corrupted = dict(FAKE_FILES, **{"items.csv": b"10,alpha\n20,BETA\n30,gamma\n"})
    archive = make_archive(tmp_path / "fake.zip", corrupted)
    dest = tmp_path / "dest"
    with pytest.raises(ChecksumError) as info:
        download(make_source(), dest, url=archive.as_uri())
    assert git_blob_of(FAKE_FILES["items.csv"]) in str(info.value)
    assert git_blob_of(corrupted["items.csv"]) in str(info.value)
    assert all_files(dest) == []


def test_missing_member_leaves_nothing(tmp_path: Path) -> None:
    archive = make_archive(tmp_path / "fake.zip", {"ratings.csv": FAKE_FILES["ratings.csv"]})
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError, match="items.csv"):
        download(make_source(), dest, url=archive.as_uri())
    assert all_files(dest) == []


def test_unknown_name_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        download("ml-10m", tmp_path)
    for name in ("ml-100k", "ml-1m", "filmtrust", "lastfm-2k"):
        assert name in str(info.value)
    assert not any(tmp_path.iterdir())


def test_redownload_is_skipped_when_files_verify(tmp_path: Path, server: _Server) -> None:
    make_archive(tmp_path / "served" / "fake.zip", FAKE_FILES)
    dest = tmp_path / "dest"
    download(make_source(), dest, url=server.url("fake.zip"))
    assert server.requests == 1
    download(make_source(), dest, url=server.url("fake.zip"))
    assert server.requests == 1
    (dest / "fake" / "ratings.csv").write_bytes(b"tampered\n")
    download(make_source(), dest, url=server.url("fake.zip"))
    assert server.requests == 2
    assert (dest / "fake" / "ratings.csv").read_bytes() == FAKE_FILES["ratings.csv"]


def test_network_error_names_url_and_manual_route(tmp_path: Path, server: _Server) -> None:
    url = server.url("absent.zip")
    with pytest.raises(DownloadError) as info:
        download(make_source(), tmp_path / "dest", url=url)
    assert url in str(info.value)
    assert "data.root" in str(info.value)
    assert all_files(tmp_path / "dest") == []


def test_not_a_zip_is_rejected(tmp_path: Path) -> None:
    page = tmp_path / "page.zip"
    page.write_bytes(b"<html>moved</html>")
    with pytest.raises(DownloadError, match=r"did not give a valid zip archive"):
        download(make_source(), tmp_path / "dest", url=page.as_uri())
    assert all_files(tmp_path / "dest") == []


def test_file_digests_match_hashlib(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_digests(path) == (sha256_of(data), git_blob_of(data))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert file_digests(empty) == (sha256_of(b""), "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391")


def test_verify_dataset_skips_missing_and_flags_bad(tmp_path: Path) -> None:
    folder = tmp_path / "fake"
    folder.mkdir()
    assert verify_dataset(make_source(), folder) == []
    (folder / "ratings.csv").write_bytes(FAKE_FILES["ratings.csv"])
    assert verify_dataset(make_source(), folder) == [folder / "ratings.csv"]
    (folder / "items.csv").write_bytes(b"wrong\n")
    with pytest.raises(ChecksumError, match="git_blob"):
        verify_dataset(make_source(), folder)


def test_filespec_rejects_unverifiable_or_unsafe_targets() -> None:
    with pytest.raises(ValueError):
        FileSpec("a/b.txt", "b.txt")
    with pytest.raises(ValueError):
        FileSpec("a/b.txt", "../b.txt", sha256="0" * 64)


def test_registry_covers_the_datasets() -> None:
    assert set(SOURCES) == {"ml-100k", "ml-1m", "filmtrust", "lastfm-2k"}
    for name, source in SOURCES.items():
        assert source.name == name
        assert source.url.startswith("https://")
        assert source.files
    ratings = next(f for f in SOURCES["ml-1m"].files if f.target == "ratings.dat")
    assert ratings.sha256 is None
    assert ratings.git_blob == "77a7c4b150f588c23bb9e1f068aa996c0b413695"


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ALIGNFEDREC_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("ALIGNFEDREC_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "alignfedrec"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "alignfedrec"


def test_main_rejects_unknown_dataset(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as err:
        main(["nope"])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: argument datasets: invalid choice: 'nope'"), lines
    assert "ml-100k" in lines[0]


@pytest.mark.skipif(not (SHARED_DATA / "ml-100k" / "u.data").is_file(), reason="shared data absent")
def test_file_digests_of_shared_u_data() -> None:
    assert file_digests(SHARED_DATA / "ml-100k" / "u.data") == (U_DATA_SHA256, U_DATA_GIT_BLOB)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data absent")
@pytest.mark.parametrize(
    "name, expected",
    [
        ("ml-100k", ["u.data", "u.item", "u.user", "README"]),
        ("ml-1m", ["movies.dat", "users.dat", "README"]),
        ("filmtrust", ["ratings.txt", "trust.txt"]),
        ("lastfm-2k", ["user_taggedartists.dat", "user_artists.dat", "artists.dat", "tags.dat"]),
    ],
)
def test_verify_dataset_on_shared_data(name: str, expected: list[str]) -> None:
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"{folder} absent")
    assert set(expected) <= {p.name for p in verify_dataset(name, folder)}


def test_known_files_hold_every_registry_file() -> None:
    for source in SOURCES.values():
        for spec in source.files:
            assert KNOWN_FILES[source.name, spec.target] == spec
